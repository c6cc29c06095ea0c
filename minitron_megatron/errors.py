"""User-facing errors: bad settings are reported once, clearly, before heavy work."""


class ConfigError(ValueError):
    """A setting is impossible. The message names the setting and what is allowed."""

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems) if len(self.problems) > 1 else self.problems[0])

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        return "invalid settings:\n" + "\n".join(f"  - {p}" for p in self.problems)
