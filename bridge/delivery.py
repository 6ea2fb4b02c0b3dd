"""Why an outbox message was not delivered, in words that may be logged and stored.

A failed push is logged and its reason kept in the outbox row (`last_error`), where an admin reads it. The
reason must not carry patient data (docs/operations.md, "Logs"): a sender's own exceptions say what went
wrong in words it chose, and any other exception is described by its class (and, for an operating-system
error, its reason) alone. An OSError's text names the file it failed on, and a thumbnail folder's file is
`<thumbnail_dir>/<PMS id>/...`: `str(exc)` put the patient's PMS id into the log.
"""

from __future__ import annotations


class DeliveryError(Exception):
    """A sender's own reason to try again later; its text names no patient data (a store id, a setting,
    a program or the push file's name at most), so it is logged and recorded as it is."""


class Undeliverable(DeliveryError):
    """A message no retry can deliver (e.g. an id that is no safe folder name): the message is marked
    failed at once, with this text as its error."""


def failure_text(exc: BaseException) -> str:
    """What is logged and recorded about a failed delivery: a DeliveryError's own text; an OSError's class
    and reason without its file names; any other exception's class only (its text may quote anything)."""
    if isinstance(exc, DeliveryError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__
