"""kmdask's logging: the ``kmdask`` logger hierarchy, one line per message on stderr.

Modules log to ``logging.getLogger(__name__)`` and never print; the command line calls
:func:`setup` once. Two formats: ``text`` (the message alone, as a person reads it) and
``json`` (one JSON object per line: time, level, logger, message, and the structured fields a
call passed with :func:`fields`, such as job, fit and iteration). A program that imports kmdask
and never calls :func:`setup` gets Python's default: warnings and errors only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

ROOT = "kmdask"
FORMATS = ("text", "json")
_FIELDS = "kmdask_fields"


def fields(**values: Any) -> dict:
    """``extra=`` for a logging call whose values should also appear as JSON fields:
    ``log.info("...", **fields(job=name, iteration=3))``."""
    return {"extra": {_FIELDS: values}}


class TextFormatter(logging.Formatter):
    """The message as written; warnings and errors say so, with the ``kmdask:`` prefix."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"kmdask: error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"kmdask: warning: {msg}"
        return msg


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
                       + f".{int(record.msecs):03d}"
                       + time.strftime("%z", time.localtime(record.created)),
               "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        out.update(getattr(record, _FIELDS, {}))
        return json.dumps(out, default=str)


def setup(verbosity: int = 0, fmt: str = "text", stream=None) -> None:
    """Send the ``kmdask`` loggers to ``stream`` (stderr) in format ``fmt``.

    Parameters
    ----------
    verbosity : int
        -1 (``-q``): warnings and errors only; 0: progress (info); 1 or more (``-v``): debug.
    fmt : {"text", "json"}
    stream : file-like, optional
        Default ``sys.stderr`` (looked up at each write, so pytest's capture sees it).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if verbosity < 0 else
                    logging.INFO if verbosity == 0 else logging.DEBUG)
    logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stderr`` is at the time of each record."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: D102 - logging's attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass
