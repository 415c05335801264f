#!/usr/bin/env python
"""Berth's command-line entry point (Django's manage.py)."""
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as exc:  # a BERTH_* setting: one line, not a traceback
        sys.exit(f"configuration error: {exc}")


if __name__ == "__main__":
    main()
