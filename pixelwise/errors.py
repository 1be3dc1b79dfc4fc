"""The one exception type for user errors: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad argument, bad file). The message names the
    file or argument, the value and the way out; it is printed without a traceback."""
