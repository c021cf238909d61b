"""Exceptions that map to the process exit codes of the public contract (README "Exit codes", docs/configuration.md)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 143


class FvAccelError(Exception):
    """Base class: an expected failure with a one-line message and an exit code."""

    exit_code = EXIT_FAILURE


class ConfigError(FvAccelError):
    """Bad configuration or command-line arguments (exit 2)."""

    exit_code = EXIT_CONFIG


class DataError(FvAccelError):
    """Unreadable or malformed training data (exit 1); the message names the file and row."""


class CheckpointError(FvAccelError):
    """A checkpoint that cannot be used (exit 1); the message names the directory."""


class NonFiniteError(FvAccelError):
    """A loss or gradient norm became NaN/Inf (exit 3); the message names the step and role."""

    exit_code = EXIT_NONFINITE


class Preempted(FvAccelError):
    """SIGTERM/SIGINT received; a checkpoint was saved (exit 143)."""

    exit_code = EXIT_PREEMPTED
