"""The errors a run reports before anything costly starts."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad input found before training; the message names each problem and its fix."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems with this run's settings:\n" + "\n".join(
                f"  - {p}" for p in self.problems)
        super().__init__(message)


class ConfigWarning(UserWarning):
    """A setting the run works around (e.g. W&B falls back to offline)."""
