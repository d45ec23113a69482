"""Reusable groups of click options, shared by the CLI's commands and the bench suites."""
from __future__ import annotations

from typing import Callable


def options(*decorators: Callable) -> Callable:
    """Apply click decorators in the order they are listed (the order --help shows)."""
    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply
