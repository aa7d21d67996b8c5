"""The one error type users see: a sentence that says what is wrong and how to fix it (CLI exit code 2)."""


class Spark3rError(ValueError):
    """Bad input or usage. The message is one sentence meant for the user."""


class Spark3rWarning(UserWarning):
    """Something the user should know that does not stop the run (e.g. a crop that drops part of the images)."""
