"""Errors about user data that point at the file and line to fix."""


class DataError(ValueError):
    """Bad training data; the message names the file and line (or the config key)."""

    def __init__(self, path: str, line: int | None, reason: str):
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")
        self.path, self.line, self.reason = path, line, reason
