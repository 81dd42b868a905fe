"""The REST mapping's OpenAPI document (docs/openapi.json, generated from the
control plane's handlers by scripts/gen-openapi) against a real `keycap dev`
of its own: the served document is the checked-in one and a valid OpenAPI
3.1 document (openapi-spec-validator), and schemathesis, with an admin token,
sends every documented operation generated valid and invalid input. No
answer may be a 5xx, and every answer must conform to the document: its
status documented, its content type and body the documented ones.

The run is bounded (examples per operation, a fixed seed) so it stays short.
"""

import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import openai
import pytest
from openapi_spec_validator import validate

from conftest import ROOT, Keycap

DOCUMENT = ROOT / "docs" / "openapi.json"

# Examples per operation and phase: enough to reach every documented status
# of every operation, small enough for CI.
MAX_EXAMPLES = 50

# Every check of the answers, less two that judge the server's design, not
# its conformance: `positive_data_acceptance` expects any schema-valid body
# to succeed (keycap refuses, say, a base URL that is not https with a 400),
# and `use_after_free` expects a DELETE to make a resource vanish (a revoked
# key or token stays readable, with status "revoked").
CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "ignored_auth",
])


@pytest.fixture(scope="module")
def fuzzed():
    """A `keycap dev` for schemathesis alone: it creates and revokes
    whatever it likes, so the other tests' instance stays untouched. The
    webhooks it registers name made-up hosts: this instance stores their
    events but never posts them nor resolves those hosts."""
    workdir = Path(tempfile.mkdtemp(prefix="keycap-openapi-"))
    k = Keycap(workdir, extra_args=["--no-webhook-deliveries"])
    try:
        yield k
    finally:
        k.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def served(url):
    with urllib.request.urlopen(f"{url}/openapi.json", timeout=30) as r:
        assert r.headers["Content-Type"] == "application/json"
        return r.read()


def test_the_document_is_valid_openapi_and_the_one_served(fuzzed):
    checked_in = DOCUMENT.read_bytes()
    assert served(fuzzed.control) == checked_in, "run scripts/gen-openapi"
    assert served(fuzzed.proxy) == checked_in, "the proxy relays /openapi.json"
    doc = json.loads(checked_in)
    assert doc["openapi"] == "3.1.0"
    validate(doc)
    # One error schema for every error answer.
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, answer in op["responses"].items():
                if status.startswith(("4", "5")):
                    ref = answer["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/ErrorBody", (method, path, status)


def resources(k):
    """What the fuzzed operations that need an existing resource get as
    their path parameters: a vendor, a key of it with a call in the audit,
    an issuer token and an admin token (each operation's own id, so the
    fuzzer reaches past "not found")."""
    key_id, secret = k.mint("openai", 5, ["POST /v1/chat/completions"], "fuzz/run-1")
    ai = openai.OpenAI(base_url=f"{k.proxy}/openai/v1", api_key=secret, max_retries=0)
    ai.chat.completions.create(model="gpt-4o", max_tokens=10,
                               messages=[{"role": "user", "content": "hi"}])
    status, issuer = k.admin("POST", f"/vault/keys/{key_id}/issuer-tokens", {"name": "fuzz"})
    assert status == 201, issuer
    status, token = k.admin("POST", "/vault/admin-tokens",
                            {"name": "fuzz", "scopes": ["keys:read"]})
    assert status == 201, token
    return {
        "get_vendor": {"name": "openai"},
        "put_vendor": {"name": "openai"},
        "delete_vendor": {"name": "anthropic"},
        "import_vendor_prices": {"name": "openai"},
        "get_key": {"id": key_id},
        "revoke_key": {"id": key_id},
        "create_issuer_token": {"id": key_id},
        "list_issuer_tokens": {"id": key_id},
        "revoke_issuer_token": {"id": issuer["id"]},
        "revoke_admin_token": {"id": token["id"]},
        "spend": {"agent_run_label": "fuzz/run-1"},
    }


def config(path, parameters):
    lines = []
    for operation, values in parameters.items():
        lines.append("[[operations]]")
        lines.append(f"include-operation-id = {json.dumps(operation)}")
        pairs = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in values.items())
        lines.append(f"parameters = {{ {pairs} }}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def test_schemathesis_finds_no_server_error_and_no_nonconforming_answer(fuzzed, tmp_path):
    doc = json.loads(DOCUMENT.read_text())
    # The document's own operation is left out by schemathesis.
    operations = sum(len(item) for item in doc["paths"].values()) - 1
    toml = config(tmp_path / "schemathesis.toml", resources(fuzzed))
    st = Path(sys.executable).parent / "st"
    r = subprocess.run(
        [str(st), "--config-file", str(toml), "run", f"{fuzzed.control}/openapi.json",
         "--url", fuzzed.control,
         "--header", f"Authorization: Bearer {fuzzed.admin_token}",
         "--checks", CHECKS,
         "--phases", "examples,coverage,fuzzing",
         "--max-examples", str(MAX_EXAMPLES),
         "--seed", "15",
         "--workers", "1",
         "--request-timeout", "30",
         "--suppress-health-check", "all",
         "--output-sanitize", "true"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-20000:]
    assert fuzzed.admin_token not in out
    # Every documented operation was exercised, and answered as documented.
    selected = re.search(r"Selected: (\d+)/(\d+)", out)
    tested = re.search(r"Tested: (\d+)", out)
    assert selected and tested, out[-5000:]
    assert int(selected.group(1)) == int(tested.group(1)) == operations, out[-5000:]
    assert re.search(r"\d+ generated, \d+ passed", out), out[-5000:]
