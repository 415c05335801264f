"""The portal in a real browser (Debian's Chromium driven by Playwright), against the real
server and the demo's two hosts with real agents: second factor, save with live progress,
restore, live migration with its chart of rounds, an upload from the vault page, and
the auditor's chain check.

Run on its own: ``make browser-test`` (``pytest tests/browser -m browser -p no:asyncio``).
Playwright never downloads a browser here: it drives the system Chromium.
"""
import hashlib
import os
import re
import time

import pytest

from tests.support.browser_pages import (
    ADMIN_PASSWORD,
    AUDITOR_PASSWORD,
    enrol_second_factor,
    migrate_precheck,
    now_step,
    shot,
    sign_in,
    totp,
)

pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.browser

JOB_TIMEOUT_MS = 90_000

LIVE_SUCCESS = """() => {
  const seen = window.__berth;
  return !!seen && seen.served.state !== "succeeded"
    && document.getElementById("job-state").textContent.trim() === "succeeded"
    && document.querySelector("#job-progress > span").style.width === "100%"
    && document.getElementById("job-progress").getAttribute("aria-valuenow") === "100"
    && seen;
}"""


def watch_job_to_success(watched, name):
    """The job page's own script moves the bar to 100 % and the badge to succeeded, live;
    then the page reloads once (for the result links) and stays put."""
    page = watched.page
    page.wait_for_url("**/jobs/*/")
    job_url = page.url
    page.wait_for_function("() => document.getElementById('live-status').textContent === 'live'")
    shot(page, f"{name}-live")
    seen = page.wait_for_function(LIVE_SUCCESS, timeout=JOB_TIMEOUT_MS).json_value()
    shot(page, f"{name}-succeeded")
    assert seen["served"]["width"] != "100%", seen
    assert seen["widths"][-1] == "100%" and seen["states"][-1] == "succeeded", seen
    loads = watched.navigations.count(job_url)
    deadline = time.monotonic() + 10
    while watched.navigations.count(job_url) == loads and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert watched.navigations.count(job_url) == loads + 1, "no reload for the result links"
    page.wait_for_load_state("load")
    page.wait_for_timeout(2000)  # a finished job's page must not reload again
    assert watched.navigations.count(job_url) == loads + 1, watched.navigations
    return seen, job_url.rstrip("/").rsplit("/", 1)[1]


def test_admin_with_second_factor_saves_restores_and_migrates(signed_in, deployment, tmp_path):
    with signed_in("admin", ADMIN_PASSWORD) as watched:
        page = watched.page
        # Password first: an admin without an authenticator is told to set one up.
        assert "Admin actions need a second factor" in page.inner_text("main")

        # Enrol: the otpauth URL under "Can't scan?" carries the base32 secret.
        secret, enrolled_at = enrol_second_factor(page, screenshot_as="01-2fa-setup")
        assert page.locator("ul.codes li").count() == 10
        shot(page, "02-2fa-backup-codes")

        # Sign out and in again: now the password is followed by the TOTP code.
        page.click("button:has-text('Sign out')")
        page.wait_for_url("**/login/**")
        sign_in(page, "admin", ADMIN_PASSWORD)
        page.wait_for_url("**/login/verify/**")
        shot(page, "03-2fa-verify")
        # A code is good once: use the next step's (within the device's tolerance of one).
        page.fill("input[name=code]", totp(secret, max(now_step(), enrolled_at + 1)))
        page.click("button:has-text('Verify')")
        page.wait_for_url(deployment.portal.url + "/")
        assert "Second factor verified." in page.inner_text("main")
        assert "Admin actions need a second factor" not in page.inner_text("main")

        # Save from the dashboard; the job page follows it live over its WebSocket.
        page.wait_for_selector("#host-hostb .badge:has-text('online')")
        page.wait_for_selector("#host-hostc .badge:has-text('online')")
        shot(page, "04-dashboard")
        page.click("#host-hostb button[data-guest='ubuntu_fuwa_nfs_domu']")
        seen, job_id = watch_job_to_success(watched, "05-save")
        job = deployment.get(f"/api/v1/jobs/{job_id}")
        assert job["kind"] == "save" and job["state"] == "succeeded" and job["image"], job

        # The image in the vault, restored to the other host with the Restore form.
        page.click(f"#job-result a[href='/vault/{job['image']}/']")
        page.wait_for_selector("h2:has-text('Restore')")
        page.select_option("select[name=host]", "hostc")
        shot(page, "06-vault-image")
        page.click("button:has-text('Restore')")
        watch_job_to_success(watched, "07-restore")
        guest = deployment.guest("ubuntu_fuwa_nfs_domu")
        assert guest["host"] == "hostc", guest

        # Live migration: guest page, Migrate…, pick hostc, Check, Migrate; then the chart.
        etch = deployment.guest("debian_etch")
        assert etch["host"] == "hostb", etch
        migrate_precheck(page, etch["uuid"], "hostc")
        assert page.locator("ul.checks li.bad").count() == 0
        shot(page, "08-migrate-precheck")
        page.click("button:has-text('Migrate to hostc')")
        watch_job_to_success(watched, "09-migrate")
        page.wait_for_selector("#rounds-chart rect.bar", state="attached")
        assert page.locator("#rounds-chart rect").count() >= 1
        shot(page, "10-migrate-chart")
        assert deployment.guest("debian_etch")["host"] == "hostc"

        # Upload from the vault page: the browser streams the file; the image page opens.
        data = os.urandom(3 * 1024 * 1024 + 100)
        (tmp_path / "upload.img").write_bytes(data)
        page.goto("/vault/upload/")
        page.fill("#f-name", "browser-upload")
        page.set_input_files("#f-file", str(tmp_path / "upload.img"))
        page.click("#upload-form button[type=submit]")
        page.wait_for_url(re.compile(r".*/vault/[0-9a-f-]{36}/$"))
        shot(page, "11-uploaded-image")
        image_id = page.url.rstrip("/").rsplit("/", 1)[1]
        image = deployment.get(f"/api/v1/images/{image_id}")
        assert (image["name"], image["plaintext_size"], image["sha256"]) == (
            "browser-upload", len(data), hashlib.sha256(data).hexdigest())


def test_auditor_verifies_the_chain(signed_in):
    with signed_in("auditor", AUDITOR_PASSWORD) as watched:
        page = watched.page
        page.goto("/audit/")
        page.click("button:has-text('Verify chain')")
        message = page.wait_for_selector("p.msg-success:has-text('Chain intact')")
        assert "records verified" in message.inner_text()
        shot(page, "11-audit-verified")
