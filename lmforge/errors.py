"""The one exception type for user error (bad input, missing model, corrupt file).

The CLI prints its message as one line on stderr and exits with code 2; the server turns it into a
400-class response. Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user asked for or supplied; the message says what is wrong and how to fix it."""
