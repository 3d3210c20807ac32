"""The one exception type for user mistakes: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A mistake the user can fix (bad key, missing dataset, unknown ticket); message says what and how."""
