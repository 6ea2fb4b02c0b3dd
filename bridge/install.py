"""`pms-bridge init`: a working home folder (config, store, TLS certificate), idempotently.

Running it again changes nothing: an existing config, certificate or store is left as it is, so an
admin can re-run the installer's command without losing the API token the PMSs are configured with. The
one exception is the store's schema: an older one is migrated to this release's (and said so), which
makes init the way to upgrade a store without starting a daemon.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import secrets
import socket
from collections.abc import Iterable
from pathlib import Path

from bridge.atomic import write_atomic
from bridge.config import ConfigError, Settings, default_config_text, load_settings, watched_folders
from bridge.config_file import DEFAULT_CONFIG_NAME, INLINE_COMMENT

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "*", ""})  # noqa: S104 - listen-all: reached on loopback


def write_self_signed(cert_path: Path, key_path: Path, hosts: Iterable[str] = ()) -> None:
    """A self-signed certificate for localhost, 127.0.0.1, ::1, this host's name and `hosts` (the
    configured listen addresses: a PMS on another computer connects to that address, and a certificate
    without it fails verification there), valid 5 years."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pms-bridge {host}")])
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName(host),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for extra in hosts:
        if extra in WILDCARD_HOSTS:
            continue
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(extra))
        except ValueError:
            entry = x509.DNSName(extra)
        if entry not in names:
            names.append(entry)
    san = x509.SubjectAlternativeName(names)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=5 * 365))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    key_path.chmod(0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def create_watched_folders(settings: Settings, home: Path) -> list[str]:
    """Create the configured watched folders that are missing and lie inside `home` (the bridge's own
    folder: a PMS on this computer writes there); a line per folder created, and one per missing folder
    elsewhere, which is left alone.

    A folder elsewhere is the PMS's share or a mapped drive: created while the share is not mounted, it
    would be a local folder on the mount point that the PMS never writes into. The daemon does not create
    any of them; it reports a missing one and watches it once it appears (bridge.watch).
    """
    lines = []
    for folder in watched_folders(settings):
        if folder.path.is_dir():
            continue
        if folder.path.resolve().is_relative_to(home):
            folder.path.mkdir(parents=True, exist_ok=True)
            lines.append(f"created the watched folder {folder.setting} {folder.path}")
        else:
            lines.append(
                f"not created: {folder.setting} {folder.path} does not exist; it is outside {home}, so it is"
                " the PMS's share: mount it or create it (the daemon watches it once it appears)"
            )
    return lines


def init_home(home: Path) -> tuple[Settings, list[str]]:
    """Create what is missing under `home` and bring an existing store's schema up to date; returns the
    settings and a line per thing done (or, for a watched folder outside `home`, left undone). A SQLite
    store whose database file is missing beside what is left of it is refused, not made anew
    (`remains_of_store`)."""
    from sqlalchemy.exc import SQLAlchemyError

    from bridge.store.db import (
        SchemaError,
        make_engine,
        remains_of_store,
        shown_url,
        unreachable,
        upgrade_schema,
    )

    done: list[str] = []
    home = home.resolve()
    if re.search(rf"\s{INLINE_COMMENT}", str(home)):
        # the config's paths would end at the " ;" (an inline comment) when read back: refused, not cut
        raise ConfigError(
            f"--home {home}: a folder name with a space before ';' cannot be written into the config"
            " (';' after a space starts a comment there): choose a folder without it"
        )
    home.mkdir(parents=True, exist_ok=True)
    config = home / DEFAULT_CONFIG_NAME
    if not config.exists():
        write_atomic(config, default_config_text(home, secrets.token_urlsafe(32)).encode())
        done.append(f"wrote {config}")
    settings = load_settings(str(config))
    remains = remains_of_store(settings.store.url, settings.store.images)
    if remains is not None:
        raise ConfigError(remains)
    api = settings.api
    if api.tls_cert and api.tls_key and not (api.tls_cert.exists() and api.tls_key.exists()):
        write_self_signed(api.tls_cert, api.tls_key, [api.host, settings.opp_web.host])
        done.append(f"wrote a self-signed certificate {api.tls_cert}")
    if not settings.store.images.exists():
        settings.store.images.mkdir(parents=True)
        done.append(f"created the image folder {settings.store.images}")
    done += create_watched_folders(settings, home)
    engine = make_engine(settings.store.url)
    try:
        # whatever [store] migrate says: running init is the admin asking for it (docs/operations.md)
        upgrade = upgrade_schema(engine)
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None
    except SQLAlchemyError as exc:
        raise ConfigError(unreachable(settings.store.url, exc)) from None
    finally:
        engine.dispose()
    if upgrade is not None and upgrade.from_revision is None:
        done.append(f"created the store {shown_url(settings.store.url)}")
    elif upgrade is not None:
        done.append(f"store {shown_url(settings.store.url)}: {upgrade.describe()}")
    return settings, done
