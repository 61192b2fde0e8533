"""The one exception type for problems a user can fix (bad input, missing file, corrupt artifact)."""


class NestlingError(Exception):
    """Raised with one line that names the problem and the fix; the CLI prints it and exits 2."""
