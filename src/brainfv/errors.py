"""Exceptions with messages that name the subject, file or config key at fault."""


class BrainFVError(Exception):
    """Base class of all brainfv errors."""


class ConfigError(BrainFVError, ValueError):
    """A configuration value is missing, of the wrong type or inconsistent."""


class InputDataError(BrainFVError, ValueError):
    """An input image or table is missing, unreadable or inconsistent."""


class UnitError(BrainFVError, KeyError):
    """A unit address (``layer:channel``) does not exist in a model."""

    def __str__(self):  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""
