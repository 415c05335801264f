from django.apps import AppConfig


class MigratorConfig(AppConfig):
    name = "migrator"
    verbose_name = "Hosts, guests and jobs"

    def ready(self):
        from migrator import signals  # noqa: F401  (links vault transfers to jobs)
