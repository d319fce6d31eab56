"""WSGI entry point (HTTP only; the platform runs on ASGI, see asgi.py)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "csplatform.settings")
application = get_wsgi_application()
