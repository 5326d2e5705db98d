class UserError(Exception):
    """Something the user asked for cannot be done; the message is one line that says why."""


class NoWeightsError(UserError):
    """A preset or a configuration alone was asked to compute numbers: it has shapes only."""
