"""Portal pages in a real browser (Playwright's sync API), for tests/browser.

A ``Watched`` page records what went wrong in it (script errors, failed requests)
and what the job page's script did; ``signed_in`` is the sign-in every browser
test starts with; ``enrol_second_factor`` turns an admin's session into one that
may act. Imports nothing from Playwright: the fixtures hand it a browser.
"""
import base64
import hashlib
import hmac
import struct
import time
from contextlib import contextmanager
from urllib.parse import parse_qs, urlparse

from tests.support.server import ROOT

ARTIFACTS = ROOT / "test-artifacts" / "browser"
TIMEOUT_MS = 30_000
ADMIN_PASSWORD = "browser-admin-pass-1234"  # the deployment fixture's demo accounts
AUDITOR_PASSWORD = "browser-auditor-pass-1234"

# Records, in the page itself, what the job page showed when it was served and every
# change its script makes afterwards: a reload starts a fresh window and loses all of it.
WATCH_JOB_PAGE = """
document.addEventListener("DOMContentLoaded", function () {
  var state = document.getElementById("job-state");
  var bar = document.querySelector("#job-progress > span");
  if (!state || !bar) return;
  window.__berth = {served: {state: state.textContent.trim(), width: bar.dataset.width + "%"},
                    widths: [], states: []};
  new MutationObserver(function () {
    var seen = window.__berth;
    if (seen.widths[seen.widths.length - 1] !== bar.style.width) seen.widths.push(bar.style.width);
    var s = state.textContent.trim();
    if (seen.states[seen.states.length - 1] !== s) seen.states.push(s);
  }).observe(document.getElementById("job-live"),
             {subtree: true, attributes: true, childList: true, characterData: true});
});
"""


class Watched:
    """A page, and what went wrong in it: script errors and failed requests."""

    def __init__(self, browser, base_url):
        self.context = browser.new_context(base_url=base_url,
                                           viewport={"width": 1280, "height": 900})
        self.context.set_default_timeout(TIMEOUT_MS)
        self.context.set_default_navigation_timeout(TIMEOUT_MS)
        self.context.add_init_script(WATCH_JOB_PAGE)
        self.page = self.context.new_page()
        self.errors, self.navigations = [], []
        self.page.on("pageerror", lambda error: self.errors.append(f"script: {error}"))
        self.page.on("response", lambda r: r.status >= 400 and not r.url.endswith(
            "/favicon.ico") and self.errors.append(f"{r.status} {r.request.method} {r.url}"))
        self.page.on("framenavigated", lambda frame: frame == self.page.main_frame
                     and self.navigations.append(frame.url))

    def close(self):
        self.context.close()


def shot(page, name):
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def totp(secret_b32: str, step: int, digits: int = 6) -> str:
    """RFC 6238 (HMAC-SHA1, 30 s steps) for time step ``step``."""
    key = base64.b32decode(secret_b32.upper() + "=" * (-len(secret_b32) % 8))
    digest = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    code = struct.unpack(">I", digest[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(code % 10 ** digits).zfill(digits)


def now_step() -> int:
    return int(time.time()) // 30


def enrol_second_factor(page, screenshot_as=None):
    """Set up an authenticator on /account/2fa/ as a user does (the secret read from the
    otpauth URL under "Can't scan?"); the session is then verified. Returns the secret
    and the time step whose code was used: a code is good once."""
    page.goto("/account/2fa/")
    page.click("summary:has-text(\"Can't scan?\")")
    otpauth = page.inner_text("details code").strip()
    if screenshot_as:
        shot(page, screenshot_as)
    secret = parse_qs(urlparse(otpauth).query)["secret"][0]
    step = now_step()
    page.fill("input[name=code]", totp(secret, step))
    page.click("button:has-text('Confirm')")
    page.wait_for_selector("h1:has-text('Your backup codes')")
    return secret, step


def migrate_precheck(page, guest_uuid, destination):
    """From the guest's page: Migrate…, pick ``destination``, Check; on the pre-check."""
    page.goto(f"/jobs/guests/{guest_uuid}/")
    page.click("a:has-text('Migrate…')")
    page.select_option("select[name=destination]", destination)
    page.click("button:has-text('Check')")
    page.wait_for_selector(f"h2:has-text('Pre-check for {destination}')")


def sign_in(page, username, password):
    """Submit the login form (what follows depends on the account: dashboard, 2FA)."""
    page.goto("/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]:has-text('Sign in')")


@contextmanager
def signed_in(browser, base_url, username, password):
    """A fresh browser session of ``username``, on the dashboard after the password.

    The block must leave the page without script errors or failed requests; if it
    fails, the page is kept as ``failed-<username>.png`` in ARTIFACTS.
    """
    watched = Watched(browser, base_url)
    try:
        sign_in(watched.page, username, password)
        watched.page.wait_for_url(base_url + "/")
        yield watched
        assert watched.errors == []
    except Exception:
        shot(watched.page, f"failed-{username}")
        raise
    finally:
        watched.close()
