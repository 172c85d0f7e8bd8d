"""Errors the services raise; the API turns each into an HTTP status with its message."""


class ServiceError(Exception):
    status_code = 400

    def __init__(self, message: str, *, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidInput(ServiceError):
    status_code = 400


class NotAllowed(ServiceError):
    status_code = 403


class Conflict(ServiceError):
    status_code = 409


class LaunchRefused(ServiceError):
    status_code = 409


class UpdateRejectedError(ServiceError):
    status_code = 422


class TooLarge(ServiceError):
    status_code = 413


class TooManyRequests(ServiceError):
    status_code = 429
