"""One exception type for problems a user can fix: the CLI prints it as a single line."""


class LmopsError(Exception):
    """A user-facing error: bad input, missing data, bad params. Printed without a traceback."""
