"""static/migrator/live.js in Chromium, against a socket the test scripts (Playwright's
WebSocket routing, no server): a repeated event is skipped, a new job's first event is
shown, and a gap in a job's ``seq`` (events the channel layer dropped) makes the page
reconnect at once for a fresh snapshot instead of staying at a stale state.
"""
import json

import pytest

from tests.support.server import ROOT

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.browser

ORIGIN = "http://berth.test"
PAGE = """<!doctype html><p id="status"></p><script>{live}</script><script>
window.received = [];
window.BerthLive("/ws/jobs/", function (event) {{
  window.received.push(event.type === "snapshot" ? "snapshot" : event.job.id + ":" + event.seq);
}}, document.getElementById("status"));
</script>"""


def snapshot(seq):
    return json.dumps({"type": "snapshot", "jobs": [{"id": "j1", "event_seq": seq}]})


def event(job, seq):
    return json.dumps({"type": "progress", "seq": seq, "job": {"id": job, "event_seq": seq}})


def test_repeats_are_skipped_and_a_gap_reconnects_for_a_fresh_snapshot(browser):
    live = (ROOT / "static/migrator/live.js").read_text()
    sockets = []
    context = browser.new_context()
    try:
        page = context.new_page()
        page.route(f"{ORIGIN}/", lambda route: route.fulfill(
            content_type="text/html", body=PAGE.format(live=live)))
        page.route_web_socket("ws://berth.test/ws/jobs/", lambda ws: sockets.append(ws))
        page.goto(f"{ORIGIN}/")
        page.wait_for_function("document.getElementById('status').textContent === 'live'")
        first = sockets[0]
        first.send(snapshot(3))
        first.send(event("j1", 3))  # published while the snapshot was read: a repeat
        first.send(event("j1", 4))
        first.send(event("j2", 1))  # a job the snapshot did not have
        first.send(event("j1", 6))  # 5 was dropped
        first.send(event("j1", 7))  # after the gap: must not be shown either
        page.wait_for_function("document.getElementById('status').textContent === 'live'"
                               " && window.received.length >= 3", timeout=10_000)
        page.wait_for_timeout(200)
        assert len(sockets) == 2, "no reconnect after the gap"
        sockets[1].send(snapshot(7))
        page.wait_for_function("window.received.length === 4", timeout=10_000)
        assert page.evaluate("window.received") == ["snapshot", "j1:4", "j2:1", "snapshot"]
    finally:
        context.close()
