"""Finding and reading the INI file, with environment overrides, using only cheap standard modules.

This is the raw layer under `bridge.config`: it knows where the file is and which strings it holds, not
what they mean. It is separate because the launch commands a PMS waits on (`pms-bridge vdds FILE`) need
the API address and token and nothing else, and must not pay for the typed, validated settings.
"""

from __future__ import annotations

import codecs
import configparser
import os

ENV_CONFIG = "PMS_BRIDGE_CONFIG"
ENV_PREFIX = "PMS_BRIDGE__"
DEFAULT_CONFIG_NAME = "pms-bridge.ini"

# Defaults the launch client needs before (or without) the typed settings; bridge.config uses the same.
DEFAULT_API_HOST = "127.0.0.1"
DEFAULT_API_PORT = 4429
DEFAULT_TLS_CERT = "{home}/tls/cert.pem"  # where `init` writes the self-signed certificate
LAUNCH_PATH = "/api/v1/launch/"

RawConfig = dict[str, dict[str, str]]

INLINE_COMMENT = ";"  # after whitespace, starts a comment that ends the value (the contract's example ini)


class ConfigFileError(Exception):
    """The config file is missing or is not valid INI; the message names the file."""


def find_config_path(explicit: str | None = None) -> str:
    """The config file to use: `--config`, then `PMS_BRIDGE_CONFIG`, then `./pms-bridge.ini`."""
    path = explicit or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG_NAME
    return os.path.abspath(path)


def read_raw(path: str, environ: dict[str, str] | None = None) -> RawConfig:
    """Read the INI file into {section: {key: value}} and apply `PMS_BRIDGE__<SECTION>__<KEY>` overrides.

    Section and key names are lower-cased; inline `;` comments (a `;` after a space or tab) are stripped
    so a value never carries its own comment. `#` starts a comment only at the start of a line: folder
    names like "Praxis #2" are common, and an inline `#` cut such a path without a word. Environment
    variables win over the file, which is what containers and Windows service wrappers expect.
    """
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(INLINE_COMMENT,), default_section="\x00no-default"
    )
    parser.optionxform = str.lower  # type: ignore[assignment,method-assign]
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError as exc:
        raise ConfigFileError(
            f"{path}: config file not found (run 'pms-bridge init --home DIR' or pass --config FILE)"
        ) from exc
    try:
        parser.read_string(decode_ini(path, data), source=path)
    except configparser.Error as exc:
        raise ConfigFileError(f"{path}: not a valid INI file: {exc}".replace("\n", " ")) from exc
    raw: RawConfig = {name.lower(): dict(parser.items(name)) for name in parser.sections()}
    env = os.environ if environ is None else environ
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].split("__")
        if len(parts) != 2 or not all(parts):
            continue
        raw.setdefault(parts[0].lower(), {})[parts[1].lower()] = value
    return raw


def decode_ini(path: str, data: bytes) -> str:
    """The file's text: UTF-8 (with or without a BOM), or UTF-16 with its BOM, which is what Windows
    Notepad saves as "Unicode". Anything else (cp1252 from an older editor) is refused with the line
    and the remedy, not read with guessed letters: a watermark or a path would silently change."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise ConfigFileError(f"{path}: not valid UTF-16 text: save the file as UTF-8") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigFileError(
            f"{path}: line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}, perhaps Windows-1252):"
            " save the file as UTF-8 (Notepad: File, Save as, Encoding UTF-8)"
        ) from exc


def config_home(path: str) -> str:
    """The folder that relative paths in the config are resolved against: the config file's folder."""
    return os.path.dirname(os.path.abspath(path))


def resolve_path(value: str, home: str) -> str:
    """A path setting as the daemon uses it: environment variables (`%WINDIR%` on Windows, `$HOME`) and
    `~` expanded, then a relative path taken from `home`, the config file's folder, never from the
    working folder (a PMS starts launch commands in its own). The one rule for every path setting:
    `bridge.config` uses it too, so the launch client finds the same files as the daemon."""
    return os.path.join(home, os.path.expanduser(os.path.expandvars(value)))


def api_endpoint(raw: RawConfig, home: str) -> tuple[str, int, str, bool, str]:
    """(host to connect to, port, token, use TLS, certificate file to trust) of the daemon's API listener.

    A wildcard listen address is reached on loopback. The certificate is `[api] tls_cert` as the daemon
    reads it (its default when the key is absent, resolved against `home`): the daemon serves that file,
    so a client trusting it trusts exactly the daemon; "" (an empty setting) leaves the system's CAs.
    Kept here, not in bridge.config, so the launch client can find the daemon without importing the
    typed settings.
    """
    api = raw.get("api", {})
    host = api.get("host", DEFAULT_API_HOST).strip() or DEFAULT_API_HOST
    if host in ("0.0.0.0", "::", "*"):  # noqa: S104 - translating a listen address, not binding
        host = "127.0.0.1"
    try:
        port = int(api.get("port", str(DEFAULT_API_PORT)))
    except ValueError:
        port = DEFAULT_API_PORT
    tls = api.get("tls", "no").strip().lower() in ("1", "yes", "true", "on")
    cert = api.get("tls_cert", DEFAULT_TLS_CERT.replace("{home}", home)).strip()
    return host, port, api.get("token", "").strip(), tls, resolve_path(cert, home) if cert else ""
