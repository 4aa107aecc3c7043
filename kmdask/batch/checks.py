"""Reading YAML safely and checking the values in it, with one-line errors that name the file,
the key (as a path such as ``fits[2].k``) and the bad value. Shared by job specs, cluster
profiles and the spec sections of job extensions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from kmdask.errors import ConfigError


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely; a missing file or a syntax error is a one-line ConfigError."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc.__class__.__name__}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}: YAML does not parse{where}: {problem}") from None


class Checker:
    """Reads typed values out of parsed YAML, raising :class:`ConfigError` s that name the file
    and the key.

    Parameters
    ----------
    source : str or Path
        The file (or a description of where the document came from), first in every message.
    """

    def __init__(self, source: str | Path):
        self.source = str(source)

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {msg}")

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key or "(top level)", f"expected a mapping, got {show(value)}")
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise self.fail(f"{key}.{unknown[0]}" if key else unknown[0],
                            f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return value

    def integer(self, value: Any, key: str, lo: int | None = None, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {show(value)}")
        if lo is not None and value < lo:
            raise self.fail(key, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise self.fail(key, f"must be <= {hi}, got {value}")
        return value

    def number(self, value: Any, key: str, lo: float | None = None,
               hi: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {show(value)}")
        if not math.isfinite(value):
            raise self.fail(key, f"expected a finite number, got {value}")
        if lo is not None and value < lo:
            raise self.fail(key, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise self.fail(key, f"must be <= {hi}, got {value}")
        return float(value)

    def string(self, value: Any, key: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty string, got {show(value)}")
        if choices is not None and value not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def ks(self, value: Any, key: str) -> list[int]:
        if isinstance(value, dict) and set(value) == {"from", "to"}:
            lo = self.integer(value["from"], f"{key}.from", 1)
            hi = self.integer(value["to"], f"{key}.to", lo)
            return list(range(lo, hi + 1))
        if isinstance(value, list):
            if not value:
                raise self.fail(key, "expected at least one K")
            return [self.integer(v, f"{key}[{i}]", 1) for i, v in enumerate(value)]
        return [self.integer(value, key, 1)]


def show(value: Any) -> str:
    """A value as error messages quote it: its repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
