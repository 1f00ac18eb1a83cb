"""Errors a user can act on: each names the input at fault and the fix."""


class TuneLabError(ValueError):
    """Bad input or an unusable file. The message names the input and what to do."""

    def __init__(self, message: str, *, input_name: str | None = None):
        self.input_name = input_name
        super().__init__(f"{input_name}: {message}" if input_name else message)


class Interrupted(RuntimeError):
    """Raised at a safe boundary when the user asked to stop (Ctrl-C, SIGTERM, ComfyUI's interrupt)."""
