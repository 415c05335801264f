"""The real server, started the way `make demo` starts it."""
import re

import httpx
import pytest

from tests.support.server import PortalServer


@pytest.fixture
def server(tmp_path):
    portal = PortalServer(tmp_path, {"BERTH_DEMO_ADMIN_PASSWORD": "smoke-test-admin-pw",
                                     "BERTH_DEMO_AUDITOR_PASSWORD": "smoke-test-auditor-pw"})
    portal.start()
    yield portal
    portal.stop()


def test_real_server_serves_login_and_signs_in(server):
    with httpx.Client(base_url=server.url, follow_redirects=False, timeout=10) as client:
        page = client.get("/login/")
        assert page.status_code == 200
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        response = client.post("/login/", data={"username": "admin",
                                                "password": "smoke-test-admin-pw",
                                                "csrfmiddlewaretoken": csrf},
                               headers={"Referer": f"{server.url}/login/"})
        assert response.status_code == 302, response.text[:500]
        dashboard = client.get("/")
        assert dashboard.status_code == 200
        assert "admin" in dashboard.text and "Dashboard" in dashboard.text
        css = client.get("/static/portal/berth.css")
        assert css.status_code == 200 and "--accent" in css.text
    server.stop()
    assert server.process.returncode is not None
