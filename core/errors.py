"""The one exception type for problems a user can fix (bad input, missing file, corrupt artifact)."""


class NestlingError(Exception):
    """Raised with one line that names the problem and the fix; the CLI prints it and exits 2."""


class ApiError(Exception):
    """An HTTP error the server answers as ``{"error": {"message", "type", "code"}}`` with this status
    (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, type_: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers or {}
