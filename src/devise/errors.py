"""User-facing errors: one line that names the file or value and what is wrong."""


class DeviseError(Exception):
    """An error caused by the user's input or environment. The CLI prints it as one line, no traceback."""
