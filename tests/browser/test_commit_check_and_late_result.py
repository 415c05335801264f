"""Two more job-page journeys in a real browser, on a deployment of their own: the
commit check an admin picks on the Migrate page, and an agent's result that arrives
after the portal has already ended the job.

An admin with a second factor, one session for the module: a TOTP code is good once,
and signing in again within its 30 s step would need the next one.
"""
import signal

import pytest

from tests.support import browser_pages
from tests.support.browser_pages import (
    ADMIN_PASSWORD,
    enrol_second_factor,
    migrate_precheck,
    shot,
)
from tests.support.polling import wait_for

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

pytestmark = pytest.mark.browser

START_TIMEOUT_S = 3
# A queued job its agent has not started within this many seconds is failed by the portal.
PORTAL_ENV = {"BERTH_JOB_START_TIMEOUT_SECONDS": str(START_TIMEOUT_S)}
JOB_TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def admin(browser, deployment):
    with browser_pages.signed_in(browser, deployment.portal.url, "admin",
                                 ADMIN_PASSWORD) as watched:
        enrol_second_factor(watched.page)
        yield watched


@pytest.fixture
def page(admin):
    """The admin's page; each test must leave it without script errors or failed requests."""
    admin.errors.clear()
    yield admin.page
    assert admin.errors == []


def test_migrating_with_the_incremental_commit_check_shows_it_in_the_final_record(
        page, deployment):
    etch = deployment.guest("debian_etch")
    assert etch["host"] == "hostb", etch
    migrate_precheck(page, etch["uuid"], "hostc")
    assert page.locator("ul.checks li.bad").count() == 0
    commit_check = page.locator("select[name=verify]")
    expect(commit_check).to_have_value("sampled")  # the deployment's default
    commit_check.select_option("incremental")
    shot(page, "12-migrate-incremental")
    page.click("button:has-text('Migrate to hostc')")

    page.wait_for_url("**/jobs/*/")
    expect(page.locator("#job-state")).to_have_text("succeeded", timeout=JOB_TIMEOUT_MS)
    final = page.locator("#migration-final")
    expect(final.locator("xpath=dt[.='commit check']/following-sibling::dd[1]")).to_have_text(
        "incremental")
    shot(page, "13-migrate-incremental-final")
    assert deployment.guest("debian_etch")["host"] == "hostc"


def test_a_bandwidth_cap_typed_on_the_migrate_page_is_shown_on_the_job_and_its_record(
        page, deployment):
    etch = deployment.guest("debian_etch")
    there = "hostb" if etch["host"] == "hostc" else "hostc"
    migrate_precheck(page, etch["uuid"], there)
    cap = page.locator("input[name=max_bandwidth_mbps]")
    expect(cap).to_have_attribute("placeholder", "none")  # the deployment's default: no cap
    cap.fill("200")
    shot(page, "13a-migrate-bandwidth-cap")
    page.click(f"button:has-text('Migrate to {there}')")

    page.wait_for_url("**/jobs/*/")
    expect(page.locator("#job-bandwidth-cap")).to_have_text("Bandwidth cap: 200 MB/s")
    expect(page.locator("#job-state")).to_have_text("succeeded", timeout=JOB_TIMEOUT_MS)
    final = page.locator("#migration-final")
    expect(final.locator("xpath=dt[.='bandwidth cap']/following-sibling::dd[1]")).to_have_text(
        "200 MB/s")
    shot(page, "13b-migrate-bandwidth-cap-final")
    assert deployment.guest("debian_etch")["host"] == there


def test_a_result_the_agent_sends_after_the_portal_failed_the_job_is_shown_on_its_page(
        page, admin, deployment):
    agent = deployment.agents["hostb"]
    page.goto("/")
    page.wait_for_selector("#host-hostb .badge:has-text('online')")
    # Frozen, hostb's agent stays connected (online) but starts nothing: the save
    # command waits, unread, in its socket.
    agent.send_signal(signal.SIGSTOP)
    try:
        page.click("#host-hostb button[data-guest='ubuntu_fuwa_nfs_domu']")
        page.wait_for_url("**/jobs/*/")
        job_url, job_id = page.url, page.url.rstrip("/").rsplit("/", 1)[1]
        expect(page.locator("#live-status")).to_have_text("live")
        expect(page.locator("#job-state")).to_have_text("queued")
        # The portal's sweep runs on agent heartbeats, job pages and the jobs API (as
        # `manage.py sweep` from a timer would); here the API is the clock.
        wait_for(lambda: deployment.get(f"/api/v1/jobs/{job_id}")["state"] == "failed",
                 "the portal to fail the unstarted save", timeout=30, interval=0.5)
        expect(page.locator("#job-state")).to_have_text("failed")  # live, no reload
        expect(page.locator("#job-error")).to_contain_text(
            f"the agent on hostb did not start the job within {START_TIMEOUT_S} s")
        shot(page, "14-late-failed-by-portal")
    finally:
        agent.send_signal(signal.SIGCONT)
    # Thawed, the agent reads the save command and then the abort the portal sent with
    # the failure: it reports the job aborted, to a portal that had it failed.
    late = page.locator("#job-late-report")
    expect(late).to_be_visible(timeout=30_000)
    text = late.inner_text()
    assert "After this job had ended, the agent on hostb reported it aborted" in text, text
    # The agent says who stopped it: the portal, with the reason it had failed the job.
    assert (": the portal had already ended the job: the agent on hostb did not start the "
            f"job within {START_TIMEOUT_S} s") in text, text
    expect(page.locator("#job-state")).to_have_text("failed")  # final stays final
    # The page's script reloaded it once, for the server to draw the report.
    assert admin.navigations.count(job_url) == 2, admin.navigations
    shot(page, "15-late-report")


def test_a_job_whose_agent_vanished_is_unknown_on_its_page_until_an_admin_settles_it(
        page, admin, deployment):
    """The agent of debian_etch's host dies with a save queued: after the agent timeout
    the page shows the job unknown, live (not failed: the agent may have done it),
    reloads once for the reason and the settle form, and the admin settles it failed."""
    host = deployment.guest("debian_etch")["host"]  # where the tests before left it
    agent = deployment.agents[host]
    page.goto("/")
    page.wait_for_selector(f"#host-{host} .badge:has-text('online')")
    agent.send_signal(signal.SIGSTOP)  # the command waits unread; then the agent dies
    try:
        page.click(f"#host-{host} button[data-guest='debian_etch']")
        page.wait_for_url("**/jobs/*/")
        job_url, job_id = page.url, page.url.rstrip("/").rsplit("/", 1)[1]
        expect(page.locator("#job-state")).to_have_text("queued")
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
    wait_for(lambda: deployment.get(f"/api/v1/jobs/{job_id}")["state"] == "unknown",
             "the portal to give up on the save", timeout=60, interval=0.5)
    expect(page.locator("#job-state")).to_have_text("unknown")  # live; not final
    expect(page.locator("#job-unknown")).to_contain_text(
        "The outcome of this job is unknown", timeout=30_000)  # after one reload
    assert admin.navigations.count(job_url) == 2, admin.navigations
    shot(page, "16-job-unknown")
    page.fill("#settle-form input[name=reason]", f"{host}'s agent crashed before reading it")
    page.click("#settle-form button[value=failed]")
    page.wait_for_url(job_url)
    expect(page.locator("#job-state")).to_have_text("failed")
    expect(page.locator("#job-settled")).to_contain_text("settled failed by admin:admin")
    job = deployment.get(f"/api/v1/jobs/{job_id}")
    assert job["state"] == "failed" and job["result"]["settled"]["by"] == "admin:admin"
    shot(page, "17-job-settled")
