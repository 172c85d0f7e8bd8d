from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from coordinator.errors import ServiceError


def _field_messages(detail, prefix: str = "") -> list[str]:
    if isinstance(detail, dict):
        return [m for key, value in detail.items() for m in _field_messages(value, f"{prefix}{key}: ")]
    if isinstance(detail, list):
        return [m for item in detail for m in _field_messages(item, prefix)]
    return [f"{prefix}{detail}"]


def exception_handler(exc, context):
    """Every error answers {"error": "<a sentence naming the problem>", ...details}."""
    if isinstance(exc, ServiceError):
        return Response({"error": exc.message, **exc.details}, status=exc.status_code)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, ValidationError):
        response.data = {"error": "; ".join(_field_messages(exc.detail)), "fields": exc.detail}
    elif isinstance(response.data, dict) and "detail" in response.data:
        response.data = {"error": str(response.data["detail"])}
    return response
