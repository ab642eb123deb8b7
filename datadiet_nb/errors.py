"""The one exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """Bad input (unknown name, value out of range, missing files): reported without a traceback."""
