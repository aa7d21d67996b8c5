"""The one error type users see: a sentence that says what is wrong and how to fix it (CLI exit code 2)."""


class Spark3rError(ValueError):
    """Bad input or usage. The message is one sentence meant for the user."""
