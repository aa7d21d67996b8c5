"""The one error type users see: a sentence that says what is wrong and how to fix it (commands exit with code 2)."""
from __future__ import annotations


class Spark3rError(ValueError):
    """Bad input or usage. The message is one sentence meant for the user."""


class ParameterError(Spark3rError):
    """Bad input traced to parameters of a library function. The message names each parameter in backquotes
    (`budget_of`); read from Python it shows the parameter's name, and a command shows its flag instead (`naming`)."""

    def __init__(self, message: str, *parameters: str):
        self.message, self.parameters = message, parameters
        super().__init__(self.naming({}))

    def naming(self, names: dict[str, str]) -> str:
        """The message with each parameter shown as names[parameter] (its own name where `names` lacks it)."""
        text = self.message
        for parameter in self.parameters:
            text = text.replace(f"`{parameter}`", names.get(parameter, parameter))
        return text
