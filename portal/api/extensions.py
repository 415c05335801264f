"""Teach drf-spectacular our authentication classes (imported from portal.apps)."""
from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ScopedTokenScheme(OpenApiAuthenticationExtension):
    target_class = "portal.authentication.ScopedTokenAuthentication"
    name = "knoxApiToken"

    def get_security_definition(self, auto_schema):
        return {"type": "apiKey", "in": "header", "name": "Authorization",
                "description": "`Token <token>`: a scoped, expiring API token "
                               "(`manage.py tokens issue` or the Tokens page)."}


class JobCredentialScheme(OpenApiAuthenticationExtension):
    target_class = "migrator.credentials.JobCredentialAuthentication"
    name = "jobCredential"

    def get_security_definition(self, auto_schema):
        return {"type": "apiKey", "in": "header", "name": "Authorization",
                "description": "`Job <credential>`: a host agent's single-use credential "
                               "for one job's image transfer."}
