from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Berth portal"

    def ready(self):
        from portal import signals  # connects login/logout auditing

        signals.connect_lockout_audit()
        from portal.api import extensions  # noqa: F401  (OpenAPI auth schemes)
