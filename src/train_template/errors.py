"""User errors: mistakes the user fixes by changing a setting, reported in one line.

Anything raised as :class:`UserError` reaches the terminal as ``error: <message>``
with exit status 2 and no traceback (see ``cli.main``). Every other exception is a
bug in the template or a library and keeps its traceback.
"""


class UserError(Exception):
    """A bad setting, bad data or an unusable checkpoint; the message says what to change."""


class PlanError(UserError, ValueError):
    """A plan input the user has to change; the message is one line naming the setting."""
