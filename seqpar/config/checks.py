"""The checks every config section uses: each raises :class:`~seqpar.errors.ConfigError` with one sentence
naming the field and the fix."""
from __future__ import annotations

from typing import Any

from seqpar.errors import ConfigError


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_choice(name: str, value: Any, choices: tuple) -> None:
    check(value in choices, f"{name}={value!r} is not one of {list(choices)}; pick one of those.")


def check_positive(name: str, value: Any) -> None:
    check(value > 0, f"{name}={value} must be > 0.")
