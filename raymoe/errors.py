"""The one error type for bad user input: names the field path and the bad value."""

from __future__ import annotations


class ConfigError(ValueError):
    """Raised for any invalid experiment or sweep setting; the CLI maps it to exit code 2."""

    def __init__(self, path: str, value: object, problem: str):
        self.path, self.value, self.problem = path, value, problem
        super().__init__(f"{path} = {_shown(value)}: {problem}" if path else problem)

    def __reduce__(self):  # rebuilt from its fields when Ray ships it between processes
        return type(self), (self.path, self.value, self.problem)


def _shown(value: object, limit: int = 120) -> str:
    """The bad value as the one-line message shows it: its repr, cut in the middle when long (400-digit numbers)."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-20:]} ({len(text)} characters)"
