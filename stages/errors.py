class UserError(Exception):
    """Something the user asked for cannot be done; the message is one line that says why."""
