from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Berth portal"

    def ready(self):
        from portal import signals  # noqa: F401  (connects login/logout auditing)
        from portal.api import extensions  # noqa: F401  (OpenAPI auth schemes)
