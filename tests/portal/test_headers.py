import re

from django.test import Client


def test_pages_carry_a_csp_without_inline_script(admin_client):
    response = admin_client.get("/")
    csp = response["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"


def test_no_page_has_inline_script(admin_client):
    for path in ["/", "/audit/", "/vault/", "/jobs/", "/people/", "/vault/upload/", "/login/"]:
        html = admin_client.get(path).content.decode()
        for tag in re.findall(r"<script[^>]*>", html):
            assert "src=" in tag, f"inline script on {path}: {tag}"
        assert " style=" not in html, f"inline style attribute on {path}"


def test_forms_carry_csrf_tokens(admin_client):
    html = admin_client.get("/people/").content.decode()
    assert html.count("<form") == html.count("csrfmiddlewaretoken") + html.count('method="get"')


def test_swagger_ui_is_served_locally_to_signed_in_users(admin_client, db):
    assert Client().get("/api/docs/").status_code == 302
    html = admin_client.get("/api/docs/").content.decode()
    assert "swagger-ui" in html and "cdn" not in html.lower()
    assert "<script>" not in html
    assert admin_client.get("/api/schema/").status_code == 200


def test_schema_needs_authentication(db):
    assert Client().get("/api/schema/").status_code == 401
