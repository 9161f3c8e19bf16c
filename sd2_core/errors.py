"""Error classes that tell a user mistake apart from a transient failure (retry only the latter)."""


class UserError(ValueError):
    """Bad input from the user: a retry cannot help, the message says what would be valid."""


class TransientError(RuntimeError):
    """A failure that may pass on its own (I/O, network, object storage): worth a retry."""
