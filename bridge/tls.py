"""Loading a listener's TLS certificate, with a one-line error naming the setting (`ConfigError`).

A missing or unreadable certificate is found at start-up, where `pms-bridge serve` reports a ConfigError
as one line; `pms-bridge doctor` runs the same loading so it names the same file and remedy.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from bridge.config import ConfigError

REMEDY = "run 'pms-bridge init' to write a self-signed one (after moving the old files away), or correct it"


def server_context(cert: tuple[str, Path], key: tuple[str, Path]) -> ssl.SSLContext:
    """A TLS 1.2+ server context from (setting, path) of the certificate and of its private key."""
    for setting, path in (cert, key):
        if not path.is_file():
            raise ConfigError(f"{setting} = {path}: no such file: {REMEDY}")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert[1], key[1])
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{cert[0]} = {cert[1]}, {key[0]} = {key[1]}: not a PEM certificate and its matching private"
            f" key ({exc.reason or exc}): {REMEDY}"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{cert[0]} = {cert[1]}, {key[0]} = {key[1]}: cannot be read ({exc.strerror or exc}): {REMEDY}"
        ) from None
    return ctx
