from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from coordinator.errors import ServiceError


def exception_handler(exc, context):
    """Service errors become their HTTP status with the message a person can act on."""
    if isinstance(exc, ServiceError):
        return Response({"error": exc.message, **exc.details}, status=exc.status_code)
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(response.data, dict) and "detail" in response.data:
        response.data = {"error": str(response.data["detail"])}
    return response
