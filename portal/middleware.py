"""Response headers Django 5.2 does not set itself: the Content-Security-Policy above all."""
from django.conf import settings

# No inline script anywhere: every page's script is a static file. Styles too,
# except that scripts may set element.style (CSSOM), which CSP allows.
DEFAULT_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
               "form-action 'self'; frame-ancestors 'none'")


class SecurityHeadersMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response
        self.policy = getattr(settings, "CONTENT_SECURITY_POLICY", DEFAULT_CSP)

    def __call__(self, request):
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", self.policy)
        response.headers.setdefault("Permissions-Policy",
                                    "camera=(), microphone=(), geolocation=(), usb=()")
        response.headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        return response
