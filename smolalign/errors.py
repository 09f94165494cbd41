"""The one exception type for user mistakes.

Anything the user can fix (a missing file, a bad column, an invalid value) is raised as `UserError`
with one sentence that says what is wrong and how to fix it. The CLI prints that sentence and exits
with status 2; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one clear sentence."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for a UserError."""
    return (str(error).splitlines() or [type(error).__name__])[0][:200]
