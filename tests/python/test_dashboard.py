"""The dashboard at /ui in a real browser: headless Chromium over WebDriver
(Debian's `chromium` and `chromium-driver`), against the same `keycap dev`
and mock vendor as the SDK tests. An operator signs in, sees a run's spend
after calls through the proxy, revokes the run with a click, and the next
call is refused; a read-only token gets no revoke button and the server
refuses the action anyway; a form posted from another site is refused. A
key minted with the form works on its first call; a run's page shows a new
call's audit entry without reloading (server-sent events); refused calls
show on the overview by reason.
Each page visited is saved as a screenshot: under $KEYCAP_SCREENSHOTS when
set (`KEYCAP_SCREENSHOTS=docs/screenshots` refreshes the README's), else in
a temporary directory, so a test run leaves the checkout as it was.
"""

import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# Selenium must use the installed driver and never look one up online.
os.environ.setdefault("SE_OFFLINE", "true")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SCREENSHOTS = Path(os.environ.get("KEYCAP_SCREENSHOTS") or tempfile.mkdtemp(prefix="keycap-ui-"))
# Most a click may take to load the page it leads to.
NAVIGATION = 30


def wait_for_page(driver, condition):
    """Polls until the page a click leads to satisfies `condition`: a
    click returns before the browser has loaded the answer."""
    WebDriverWait(driver, NAVIGATION, poll_frequency=0.05).until(condition)


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail("headless Chromium is required: apt-get install chromium chromium-driver "
                    "(.ci/run installs them)")
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def screenshot(driver, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def sign_in(driver, keycap, token, shot=None):
    driver.get(f"{keycap.control}/ui/sign-in")
    driver.delete_all_cookies()
    driver.get(f"{keycap.control}/ui/sign-in")
    if shot:
        screenshot(driver, shot)
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form[action='/ui/sign-in'] button").click()
    wait_for_page(driver, lambda d: d.current_url != f"{keycap.control}/ui/sign-in"
                  or "role=\"alert\"" in d.page_source)
    assert driver.current_url == f"{keycap.control}/ui", driver.page_source


def charge(keycap, secret):
    """One $1 Stripe charge through the proxy: (status, body text)."""
    req = urllib.request.Request(
        f"{keycap.proxy}/stripe/v1/payment_intents",
        data=b"amount=100&currency=usd&confirm=true", method="POST",
        headers={"Authorization": f"Bearer {secret}",
                 "Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def buttons(driver, text):
    return [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == text]


def run_url(keycap, label):
    return f"{keycap.control}/ui/run?label={urllib.parse.quote(label, safe='')}"


def test_an_operator_sees_a_runs_spend_and_revokes_it(keycap, browser):
    label = "dashboard/browser-run"
    key_id, secret = keycap.mint("stripe", 20, ["POST /v1/payment_intents"], label)
    for _ in range(2):
        assert charge(keycap, secret)[0] == 200
    keycap.wait_spend(key_id, 2_000_000, 2)

    sign_in(browser, keycap, keycap.admin_token, shot="sign-in")
    assert label in browser.find_element(By.TAG_NAME, "main").text
    screenshot(browser, "overview")
    browser.get(f"{keycap.control}/ui/keys")
    assert key_id in browser.page_source
    screenshot(browser, "keys")
    browser.get(f"{keycap.control}/ui/vendors")
    assert keycap.mock_url in browser.page_source
    screenshot(browser, "vendors")
    browser.get(f"{keycap.control}/ui/audit?label={urllib.parse.quote(label, safe='')}")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#audit tbody tr")) == 2
    screenshot(browser, "audit")

    browser.get(run_url(keycap, label))
    assert browser.find_element(By.ID, "run-spend").text == "$2"
    screenshot(browser, "run")
    [revoke] = buttons(browser, "Revoke run")
    revoke.click()
    wait_for_page(browser, lambda d: d.current_url.endswith("/ui/run/revoke"))
    assert "Revoked run" in browser.page_source
    confirmed = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#confirmed li")]
    assert confirmed, browser.page_source
    assert not browser.find_elements(By.ID, "unconfirmed")
    screenshot(browser, "revoked")

    status, body = charge(keycap, secret)
    assert status == 401 and "key_revoked" in body, body
    assert keycap.key(key_id)["status"] == "revoked"


def test_a_key_minted_with_the_form_works_on_its_first_call(keycap, browser):
    label = "dashboard/minted"
    sign_in(browser, keycap, keycap.admin_token)
    browser.get(f"{keycap.control}/ui/keys")
    form = browser.find_element(By.CSS_SELECTOR, "form.mint")
    form.find_element(By.NAME, "vendor").send_keys("stripe")
    form.find_element(By.NAME, "daily_usd_cap").send_keys("5")
    form.find_element(By.NAME, "allowed_endpoints").send_keys("POST /v1/payment_intents")
    form.find_element(By.NAME, "agent_run_label").send_keys(label)
    form.find_element(By.CSS_SELECTOR, "button[type='submit']").click()
    wait_for_page(browser, lambda d: d.find_elements(By.ID, "key-secret"))
    secret = browser.find_element(By.ID, "key-secret").text
    key_id = browser.find_element(By.ID, "key-id").text
    assert secret.startswith("kc_"), secret
    screenshot(browser, "key-minted")

    # The form's answer waited for the proxies: the very first call works.
    status, body = charge(keycap, secret)
    assert status == 200, body
    keycap.wait_spend(key_id, 1_000_000, 1)
    # Shown once: no page shows the secret again.
    browser.get(f"{keycap.control}/ui/keys?label={urllib.parse.quote(label, safe='')}")
    assert key_id in browser.page_source
    assert secret not in browser.page_source
    browser.get(run_url(keycap, label))
    assert secret not in browser.page_source


def test_a_runs_audit_entries_arrive_without_reloading(keycap, browser):
    label = "dashboard/live"
    key_id, secret = keycap.mint("stripe", 20, ["POST /v1/payment_intents"], label)
    assert charge(keycap, secret)[0] == 200
    keycap.wait_spend(key_id, 1_000_000, 1)
    sign_in(browser, keycap, keycap.admin_token)
    browser.get(run_url(keycap, label))
    rows = lambda d: d.find_elements(By.CSS_SELECTOR, "#run-audit tbody tr")  # noqa: E731
    assert len(rows(browser)) == 1, browser.page_source
    # The script has its stream open once it says so.
    wait_for_page(browser, lambda d: d.find_element(By.ID, "live-status").text.startswith("Live"))
    page_id = browser.execute_script("return window.performance.timeOrigin")

    assert charge(keycap, secret)[0] == 200
    WebDriverWait(browser, 30, poll_frequency=0.1).until(lambda d: len(rows(d)) == 2)
    assert browser.execute_script("return window.performance.timeOrigin") == page_id, "no reload"
    newest = rows(browser)[0]
    assert newest.get_attribute("class") == "fresh"
    cells = [td.text for td in newest.find_elements(By.TAG_NAME, "td")]
    assert cells[2] == key_id and cells[3] == "stripe POST /v1/payment_intents", cells
    assert cells[5] == "$1", cells
    screenshot(browser, "run-live")


def test_refused_calls_show_on_the_overview_by_reason(keycap, browser):
    key_id, secret = keycap.mint("stripe", 5, ["POST /v1/payment_intents"],
                                 "dashboard/refused")
    req = urllib.request.Request(f"{keycap.proxy}/stripe/v1/customers",
                                 headers={"Authorization": f"Bearer {secret}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 403
    assert "endpoint_not_allowed" in refused.value.read().decode()

    # The proxy reports a minute's refusals once that minute is over.
    sign_in(browser, keycap, keycap.admin_token)
    deadline = time.monotonic() + 120
    while not browser.find_elements(By.XPATH, f"//table[@id='refusals-by-key']//td[small='{key_id}']"):
        assert time.monotonic() < deadline, browser.page_source
        time.sleep(1)
        browser.get(f"{keycap.control}/ui")
    row = browser.find_element(By.XPATH, f"//table[@id='refusals-by-key']//tr[td/small='{key_id}']")
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "endpoint_not_allowed" and cells[4] == "1", cells
    chart = browser.find_element(By.CSS_SELECTOR, "#refusals svg")
    assert "endpoint_not_allowed" in chart.get_attribute("innerHTML")
    screenshot(browser, "overview-refusals")


def test_a_read_only_token_has_no_revoke_button_and_is_refused(keycap, browser):
    key_id, _ = keycap.mint("stripe", 5, ["POST /v1/payment_intents"], "dashboard/read-only")
    status, token = keycap.admin("POST", "/vault/admin-tokens",
                                 {"name": "dashboard viewer", "scopes": ["keys:read"]})
    assert status == 201, token
    sign_in(browser, keycap, token["token"])
    browser.get(f"{keycap.control}/ui/keys?label=dashboard%2Fread-only")
    assert key_id in browser.page_source
    assert not buttons(browser, "Revoke")
    browser.get(run_url(keycap, "dashboard/read-only"))
    assert not buttons(browser, "Revoke run")

    # The server refuses the action itself, whatever the page offered: the
    # browser's own session and CSRF value, posted without a button.
    csrf = browser.find_element(By.CSS_SELECTOR, "input[name=csrf]").get_attribute("value")
    cookie = browser.get_cookie("keycap_session")["value"]
    req = urllib.request.Request(
        f"{keycap.control}/ui/keys/{key_id}/revoke",
        data=urllib.parse.urlencode({"csrf": csrf}).encode(), method="POST",
        headers={"Cookie": f"keycap_session={cookie}",
                 "Content-Type": "application/x-www-form-urlencoded"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 403
    assert "keys:revoke" in refused.value.read().decode()
    assert keycap.key(key_id)["status"] == "active"


def test_a_form_posted_from_another_site_is_refused(keycap, browser):
    label = "dashboard/cross-site"
    key_id, _ = keycap.mint("stripe", 5, ["POST /v1/payment_intents"], label)
    sign_in(browser, keycap, keycap.admin_token)
    browser.get(run_url(keycap, label))
    # Even the session's real CSRF value does not help a page on another
    # origin (here: another port of the same host).
    csrf = browser.find_element(By.CSS_SELECTOR, "input[name=csrf]").get_attribute("value")
    page = f"""<!doctype html><title>elsewhere</title>
<form method="post" action="{keycap.control}/ui/run/revoke">
<input type="hidden" name="csrf" value="{csrf}">
<input type="hidden" name="label" value="{label}">
<button type="submit">Win a prize</button></form>""".encode()

    class Attacker(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        [prize] = buttons(browser, "Win a prize")
        prize.click()
        wait_for_page(browser, lambda d: d.current_url.startswith(keycap.control))
        assert browser.current_url == f"{keycap.control}/ui/run/revoke"
        assert "cross-site request refused" in browser.page_source, browser.page_source
    finally:
        server.shutdown()
    assert keycap.key(key_id)["status"] == "active"


class HookReceiver:
    """A webhook receiver on 127.0.0.1 that answers 200 and keeps bodies."""

    def __init__(self):
        self.bodies = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def test_an_operator_registers_and_tests_a_webhook(keycap, browser):
    receiver = HookReceiver()
    try:
        sign_in(browser, keycap, keycap.admin_token)
        browser.get(f"{keycap.control}/ui/webhooks")
        form = browser.find_element(By.CSS_SELECTOR, "form.register")
        form.find_element(By.NAME, "url").send_keys(receiver.url)
        form.find_element(By.CSS_SELECTOR, "input[value='cap.threshold']").click()
        thresholds = form.find_element(By.NAME, "thresholds")
        thresholds.clear()
        thresholds.send_keys("80,100")
        form.find_element(By.CSS_SELECTOR, "button[type='submit']").click()
        wait_for_page(browser, lambda d: d.find_elements(By.ID, "secret"))
        secret = browser.find_element(By.ID, "secret").text
        assert secret.startswith("whsec_"), secret
        screenshot(browser, "webhooks")
        link = browser.find_element(By.CSS_SELECTOR, "#webhooks a")
        webhook_id = link.text
        link.click()
        wait_for_page(browser, lambda d: d.current_url.endswith(f"/ui/webhooks/{webhook_id}"))
        assert secret not in browser.page_source
        buttons(browser, "Send test event")[0].click()
        wait_for_page(browser, lambda d: d.find_elements(By.ID, "queued"))
        deadline = time.monotonic() + 20
        while "HTTP 200" not in browser.page_source:
            assert time.monotonic() < deadline, browser.page_source
            time.sleep(0.2)
            browser.get(f"{keycap.control}/ui/webhooks/{webhook_id}")
        assert receiver.bodies and b"webhook.test" in receiver.bodies[-1]
        screenshot(browser, "webhook-deliveries")
        keycap.admin("DELETE", f"/vault/webhooks/{webhook_id}")
    finally:
        receiver.server.shutdown()


def test_every_page_fits_a_phone_and_labels_every_control(keycap, browser):
    sign_in(browser, keycap, keycap.admin_token)
    browser.set_window_size(390, 844)
    try:
        for path in ["/ui", "/ui/keys", "/ui/vendors", "/ui/audit", "/ui/webhooks",
                     "/ui/run?label=dashboard%2Fbrowser-run"]:
            browser.get(f"{keycap.control}{path}")
            overflow = browser.execute_script(
                "return document.documentElement.scrollWidth - "
                "document.documentElement.clientWidth")
            wide = browser.execute_script("""
                const w = document.documentElement.clientWidth;
                return [...document.querySelectorAll('body *')]
                  .filter(e => e.getBoundingClientRect().right > w + 1
                               && !e.closest('.table-wrap'))
                  .slice(0, 5).map(e => e.tagName + '.' + e.className + '#' + e.id
                                   + ':' + Math.round(e.getBoundingClientRect().width));""")
            assert overflow <= 0, f"{path} scrolls sideways by {overflow}px on a phone: {wide}"
            unlabeled = browser.execute_script("""
                return [...document.querySelectorAll('input:not([type=hidden]), select, button')]
                  .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                               && !(e.textContent || '').trim())
                  .map(e => e.outerHTML);""")
            assert unlabeled == [], f"{path}: controls without a label: {unlabeled}"
        screenshot(browser, "phone-webhooks")
    finally:
        browser.set_window_size(1280, 900)
