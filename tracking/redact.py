"""Secrets never reach the store or the console: redact credentials in any text.

``redact(text)`` removes the user-info of URLs (``http://alice:pw@host`` -> ``http://***@host``),
``password=``-style query values, and the values of secret-looking environment variables
(``MLFLOW_TRACKING_PASSWORD``, ``*_TOKEN``, ``*_SECRET*``, ...). Every tag, param, failure reason,
printed message and traceback of ``tracking`` goes through it; ``install_log_filter`` applies it
to the log records of MLflow and urllib3 as well.
"""
from __future__ import annotations

import logging
import os
import re

MASK = "***"
# scheme://user[:password]@ -> scheme://***@  (a token used as user name is a secret too)
# (up to the last '@' before the path: an unencoded '@' in a password must not leak its tail)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s'\"]+@")
_QUERY = re.compile(r"(?i)(?P<key>\b(?:password|passwd|pwd|token|secret|access_key|api_key)=)[^&\s'\"]+")
# Environment variables whose value is a secret: one '_'-separated word of the name is one of these.
_SECRET_WORDS = {"PASSWORD", "PASSWD", "TOKEN", "SECRET", "CREDENTIALS", "APIKEY"}
_SECRET_NAMES = {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCESS_KEY",
                 "AZURE_STORAGE_CONNECTION_STRING", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD"}
_MIN_SECRET_LEN = 6  # shorter values ("1", "true") would mask ordinary words


def _is_secret_name(name: str) -> bool:
    upper = name.upper()
    return upper in _SECRET_NAMES or bool(_SECRET_WORDS & set(upper.split("_")))


def secret_values() -> list[str]:
    """Values of secret-looking environment variables, longest first (so none masks a part of
    another)."""
    values = {v for k, v in os.environ.items() if _is_secret_name(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` without credentials (see the module docstring); other text unchanged."""
    if not text:
        return text
    out = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", str(text))
    out = _QUERY.sub(lambda m: f"{m.group('key')}{MASK}", out)
    for value in secret_values():
        out = out.replace(value, MASK)
    return out


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (after %-formatting) with :func:`redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logged as it is
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None:
            import traceback
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info = None
        return True


_FILTER = RedactingFilter()


def install_log_filter(names: tuple[str, ...] = ("", "mlflow", "urllib3", "requests")) -> None:
    """Attach the redacting filter to these loggers and to their handlers (a handler filter also
    sees records propagated from child loggers). Idempotent."""
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
