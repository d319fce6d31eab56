"""One JSON shape for every API error, including the ones Django raises before DRF sees them.

DRF's handler already turns validation, auth, parse (400), media type (415) and throttle (429)
errors into JSON. What it does not know is Django's RequestDataTooBig, raised when a body is
over DATA_UPLOAD_MAX_MEMORY_SIZE: without this it would surface as a 500.
"""

from django.core.exceptions import RequestDataTooBig
from django.utils.translation import gettext as _
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


def exception_handler(exc, context):
    if isinstance(exc, RequestDataTooBig):
        return Response(
            {"detail": _("The request body is too large.")},
            status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        )
    return drf_exception_handler(exc, context)
