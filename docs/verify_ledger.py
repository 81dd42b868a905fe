#!/usr/bin/env python3
"""Verify a keycap audit ledger export (JSON Lines or CSV) on its own.

Usage: python3 verify_ledger.py EXPORT [--from-hash HEX] [--checkpoint SEQ:HASH]...

EXPORT is read as CSV when its first line is the CSV header (starts with
"seq,"), else as JSON Lines.

Reads the export in seq order, recomputes every entry's hash from its
fields as docs/ledger.md describes, and checks that each entry's prev_hash
is the hash of the entry before it. Each --checkpoint (one kept from
earlier, as `keycap audit checkpoints` lists it) must be in the export:
the entry SEQ with exactly that hash. Prints the head (last seq and hash)
and exits 0 when all of that holds; names the first broken entry or the
checkpoint not reached and exits 1 otherwise. Standard library only.
"""
import csv
import hashlib
import json
import struct
import sys

INTEGERS = ("seq", "upstream_status", "reserved_micros", "cost_micros", "at_micros",
            "refused_calls", "credential_version")


def s(value):
    data = value.encode("utf-8")
    return struct.pack(">I", len(data)) + data


def i(value):
    return struct.pack(">q", value)


def canonical(e):
    out = i(e["seq"])
    for f in ("event_id", "key_id", "agent_run_label", "vendor", "method", "path"):
        out += s(e[f])
    out += i(e["upstream_status"]) + i(e["reserved_micros"]) + i(e["cost_micros"])
    out += s(e["outcome"]) + i(e["at_micros"])
    for f in ("node_id", "lease_id", "day", "detail_json", "trace_id"):
        out += s(e[f])
    ctx = sorted(e["context"].items(), key=lambda kv: kv[0].encode("utf-8"))
    out += struct.pack(">I", len(ctx))
    for k, v in ctx:
        out += s(k) + s(v)
    if e["outcome"] == "refused":
        out += s(e["refusal_reason"]) + i(e["refused_calls"])
    if e.get("credential_version", 0) or e.get("would_refuse", ""):
        out += i(e.get("credential_version", 0))
    if e.get("would_refuse", ""):
        out += s(e["would_refuse"])
    return out


def records(f):
    """The export's entries, each a dict with the JSON Lines field names."""
    first = f.readline()
    f.seek(0)
    if not first.startswith("seq,"):
        for line in f:
            if line.strip():
                yield json.loads(line)
        return
    for row in csv.DictReader(f):
        for name in INTEGERS:
            row[name] = int(row[name])
        row["context"] = json.loads(row["context"])
        yield row


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    prev = None
    if "--from-hash" in argv:
        prev = bytes.fromhex(argv[argv.index("--from-hash") + 1])
    held = {}
    for n, arg in enumerate(argv):
        if arg == "--checkpoint":
            point = argv[n + 1] if n + 1 < len(argv) else ""
            seq, _, digest = point.partition(":")
            if not seq.isdigit() or len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
                print(f"--checkpoint {point!r} is not SEQ:HASH (a seq, a colon, 64 hex digits)",
                      file=sys.stderr)
                return 2
            held[int(seq)] = digest.lower()
    count = 0
    last_seq = None
    with open(argv[1], encoding="utf-8", newline="") as f:
        for e in records(f):
            if not e["hash"]:
                if prev is not None:
                    print(f"BROKEN at seq {e['seq']}: unchained entry after the chain started")
                    return 1
                continue  # written before the ledger was chained
            expected_prev = prev if prev is not None else bytes(32)
            if bytes.fromhex(e["prev_hash"]) != expected_prev:
                print(f"BROKEN at seq {e['seq']}: prev_hash is not the hash of the entry before it")
                return 1
            h = hashlib.sha256(expected_prev + canonical(e)).digest()
            if h.hex() != e["hash"]:
                print(f"BROKEN at seq {e['seq']}: content does not match its hash")
                return 1
            if e["seq"] in held and held.pop(e["seq"]) != e["hash"]:
                print(f"BROKEN at seq {e['seq']}: not the hash the checkpoint holds")
                return 1
            prev, last_seq, count = h, e["seq"], count + 1
    for seq in sorted(held):
        print(f"BROKEN at seq {seq}: the checkpoint's entry is not in the export")
        return 1
    print(f"OK {count} entries, head seq {last_seq} hash {prev.hex() if prev else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
