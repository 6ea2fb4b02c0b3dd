"""`pms-bridge doctor`: "configure and test PMS integration", as a checklist an IT admin can read.

Each check prints one line, `ok`, `WARN` or `FAIL` with what to do; the exit code is 0 only when none
fails: 1 when a check fails, 2 when the config cannot be loaded (no check could run, as every other
command exits 2 on a config it cannot use). A WARN is a set-up that works but leaves something open (a
listener beyond loopback without TLS or token) that a practice may have chosen on purpose, so it does not
fail the checklist.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bridge.config import (
    ConfigError,
    Settings,
    exposure_warnings,
    init_home_of,
    launch_profiles,
    load_settings,
    watched_folders,
)
from bridge.config_file import api_endpoint, read_raw
from bridge.handlers import vdds_register
from bridge.launch import client_context

Check = tuple[str, Callable[[Settings], str]]  # (title, function returning a detail or raising)

EXIT_CHECK_FAILED = 1
EXIT_NO_CONFIG = 2


class CheckFailed(Exception):
    pass


class CheckWarning(Exception):
    """The check found something to fix that does not stop the bridge from working."""


def check_exposure(settings: Settings) -> str:
    """The listen addresses: the API beyond loopback needs TLS, OPP web beyond loopback a token."""
    warnings = exposure_warnings(settings)
    if warnings:
        raise CheckWarning("; ".join(warnings))
    listeners = [f"[api] {settings.api.host}" + (" with TLS" if settings.api.tls else "")]
    if settings.opp_web.enabled:
        listeners.append(
            f"[opp_web] {settings.opp_web.host}" + (" with a token" if settings.opp_web.token else "")
        )
    return ", ".join(listeners)


def check_store(settings: Settings) -> str:
    """Reachable, and at the schema this release needs (else what to do: it depends on [store] migrate).
    A SQLite file that does not exist is reported, not created (as opening it would)."""
    from sqlalchemy.exc import SQLAlchemyError

    from bridge.store.db import (
        DatabaseFileMissing,
        current_revision,
        make_engine,
        schema_problem,
        shown_url,
        unreachable,
    )

    try:
        engine = make_engine(settings.store.url, create=False, home=init_home_of(settings))
    except DatabaseFileMissing as exc:
        raise CheckFailed(str(exc)) from None
    try:
        revision = current_revision(engine)
    except SQLAlchemyError as exc:  # one line: the driver's reason, not SQLAlchemy's link below it
        raise CheckFailed(unreachable(settings.store.url, exc)) from None
    finally:
        engine.dispose()
    problem = schema_problem(
        settings.store.url, revision, migrate=settings.store.migrate, home=init_home_of(settings)
    )
    if problem is not None:
        raise CheckFailed(problem)
    return f"{shown_url(settings.store.url)} (schema {revision})"


def check_tls(settings: Settings) -> str:
    """The listeners' certificates load, as `serve` loads them (a missing or corrupt file is named)."""
    from bridge.daemon import tls_context
    from bridge.web.oppweb import server_tls

    used = []
    try:
        if tls_context(settings) is not None:
            used.append(f"[api] {settings.api.tls_cert}")
        if server_tls(settings) is not None:
            used.append(f"[opp_web] {settings.opp_web.tls_cert or settings.api.tls_cert}")
    except ConfigError as exc:
        raise CheckFailed(str(exc)) from None
    return "; ".join(used) or "not used (tls = no)"


IMAGE_FOLDER_REMEDY = "mount it, or correct [store] images; 'pms-bridge init' creates it for a new store"
WATCHED_FOLDER_REMEDY = (
    "mount it, or create the folder the PMS writes into; the daemon never creates it and watches it as"
    " soon as it appears"
)


def check_folder(path: Path, *, what: str = "the image folder", remedy: str = IMAGE_FOLDER_REMEDY) -> str:
    """Writable. A missing folder is reported, never created (the image folder, a thumbnail folder, a
    watched folder), as the daemon never creates them: on an unmounted share's mount point, creating it
    would hide the missing share behind an empty local folder, which the daemon would deliver into or
    watch while the PMS uses the share."""
    from bridge.store.files import FileStore

    try:
        FileStore(path).check_writable()
    except FileNotFoundError:
        raise CheckFailed(f"{what} {path} does not exist: is the share mounted? ({remedy})") from None
    except OSError as exc:
        raise CheckFailed(
            f"{path}: {exc.strerror or exc} (a share needs a UNC path and an account with rights)"
        ) from None
    return str(path)


def check_image_folder(settings: Settings) -> str:
    """Writable, and with at least `[store] min_free_mb` free: a full disk refuses every new image."""
    from bridge.store.files import FileStore

    folder = check_folder(settings.store.images)
    free_mb = FileStore(settings.store.images).free_bytes() // 2**20
    if free_mb < settings.store.min_free_mb:
        raise CheckFailed(
            f"{folder}: only {free_mb} MB free (under [store] min_free_mb = {settings.store.min_free_mb}):"
            " free space or move the store; when it is full, imports and acquisitions are refused (507)"
        )
    return f"{folder} ({free_mb / 1024:.1f} GB free)"


def _get(settings: Settings, path: str, token: str | None) -> tuple[int, bytes]:
    """GET `path` from the daemon, reached as a launch command reaches it: the same address and the same
    trust in its certificate (`api_endpoint`, `client_context`), so this fails when launches would."""
    host, port, _token, tls, cafile = api_endpoint(read_raw(str(settings.path)), str(settings.home))
    scheme = "https" if tls else "http"
    request = urllib.request.Request(f"{scheme}://{host}:{port}{path}")  # noqa: S310 - our own daemon
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        context = client_context(cafile) if tls else None
    except OSError as exc:
        raise CheckFailed(f"{exc.strerror}: launch commands cannot connect to the daemon either") from None
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:  # noqa: S310
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLCertVerificationError):  # it answers: its certificate is the problem
            problem = "does not cover that address" if "mismatch" in reason.verify_message else "fails"
            raise CheckFailed(
                f"the daemon answers at {host}:{port} but its certificate {cafile} {problem}"
                f" ({reason.verify_message}): move the certificate and its key away and run"
                " 'pms-bridge init --home' again (it writes one for [api] host), or set [api] tls_cert"
                " and tls_key to a certificate for that address"
            ) from None
        raise CheckFailed(
            f"the daemon does not answer at {host}:{port} ({getattr(exc, 'reason', exc)}): "
            "start 'pms-bridge serve'"
        ) from None


def check_exchange_folder(settings: Settings) -> str:
    """`[vdds] exchange_dir`, when the daemon watches it (bridge.config.watched_folders: configured and
    VDDS enabled): writable (answers are written into it)."""
    checked = [
        check_folder(folder.path, what=folder.setting, remedy=WATCHED_FOLDER_REMEDY)
        for folder in watched_folders(settings)
        if folder.section == "vdds"
    ]
    return "; ".join(checked) or "not configured"


def check_profile_folders(settings: Settings) -> str:
    """The Dexis/Dentrix Integrator folders the daemon watches (bridge.config.watched_folders) and the
    thumbnail folders of the PMS profiles that use them; none of them is created (the PMS's share)."""
    integrators = {folder.section: folder for folder in watched_folders(settings)}
    checked = []
    for name, profile in launch_profiles(settings).items():
        integrator = integrators.get(name)
        if integrator is not None:
            folder = check_folder(integrator.path, what=integrator.setting, remedy=WATCHED_FOLDER_REMEDY)
            checked.append(f"{integrator.setting} {folder}")
        if profile.thumbnails and profile.thumbnail_dir is not None:
            folder = check_folder(
                profile.thumbnail_dir,
                what=f"[{name}] thumbnail_dir",
                remedy="mount it, or create the folder the PMS reads; the bridge never creates it",
            )
            checked.append(f"[{name}] thumbnail_dir {folder}")
    return "; ".join(checked) or "not configured"


def check_import_folders(settings: Settings) -> str:
    """`[dicom] import_folders`: each a folder this account can list (a JSON import reads below it and
    writes nothing there). A missing one is most often a share that is not mounted, or a CD not inserted."""
    checked = []
    for folder in settings.dicom.import_folders:
        try:
            with os.scandir(folder):
                pass
        except (FileNotFoundError, NotADirectoryError):
            raise CheckFailed(
                f"[dicom] import_folders: {folder} is not a folder here: is the share mounted? (mount it,"
                " or take it off the list)"
            ) from None
        except OSError as exc:
            raise CheckFailed(
                f"[dicom] import_folders: {folder}: {exc.strerror or exc} (the daemon's account must be able"
                " to read it)"
            ) from None
        checked.append(str(folder))
    return "; ".join(checked) or "not configured"


STUCK_SENDING_SECONDS = 15 * 60  # far longer than a push takes with the default push_timeout (2 min)
LATE_PENDING_SECONDS = 60 * 60  # the backoff has reached its 15-minute steps by then


def check_outbox(settings: Settings) -> str:
    """Pushes to PMSs given up on (failed), held by a daemon for too long (sending: it died or hangs) or
    waiting long (pending: the PMS or its share is away). None of them makes the daemon unready."""
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session

    from bridge.outbox_admin import outbox_counts, per_channel
    from bridge.store.db import SCHEMA_HEAD, DatabaseFileMissing, current_revision, make_engine, unreachable
    from bridge.store.types import utcnow

    try:
        engine = make_engine(settings.store.url, create=False)
    except DatabaseFileMissing:  # the store's line says which file and what to do
        raise CheckWarning(
            "not checked: the store's database file does not exist (see the store's line)"
        ) from None
    try:
        if current_revision(engine) != SCHEMA_HEAD:
            raise CheckWarning("not checked until the schema is up to date (see the store's line)")
        with Session(engine) as session:
            counts = outbox_counts(session)
    except SQLAlchemyError as exc:
        raise CheckFailed(unreachable(settings.store.url, exc)) from None
    finally:
        engine.dispose()
    now = utcnow()
    failed = [r for r in counts if r.state == "failed"]
    stuck = [r for r in counts if r.state == "sending" and r.age_seconds(now) > STUCK_SENDING_SECONDS]
    late = [r for r in counts if r.state == "pending" and r.age_seconds(now) > LATE_PENDING_SECONDS]
    problems = []
    if failed:
        problems.append(
            f"{per_channel(failed)} failed, given up after about 44 h of retries: fix the cause"
            " ('pms-bridge outbox list' shows the errors), then run 'pms-bridge outbox retry'"
        )
    if stuck:
        problems.append(
            f"{per_channel(stuck)} sending for over {STUCK_SENDING_SECONDS // 60} min: a daemon hangs in a"
            " push, or one died and no running daemon serves that channel to take them over"
        )
    if late:
        problems.append(
            f"{per_channel(late)} waiting for over {LATE_PENDING_SECONDS // 60} min: is a daemon serving"
            " that channel running, and the PMS or its share reachable? ('pms-bridge outbox list')"
        )
    if problems:
        raise CheckWarning("; ".join(problems))
    waiting = {state: sum(r.count for r in counts if r.state == state) for state in ("pending", "sending")}
    return f"{waiting['pending']} pending, {waiting['sending']} sending, none failed"


def check_daemon(settings: Settings) -> str:
    """Alive and ready; when not ready, each failing /readyz check with the daemon's own reason (a
    watched folder that is missing, a database file deleted under it): what the daemon sees may differ
    from what the checks above see from here."""
    status, _ = _get(settings, "/healthz", None)
    if status != 200:
        raise CheckFailed(f"/healthz answered {status}")
    status, body = _get(settings, "/readyz", None)
    if status != 200:
        failing = [
            f"{name} ({check['error']})" if check.get("error") else name
            for name, check in json.loads(body).get("checks", {}).items()
            if not check.get("ok")
        ]
        raise CheckFailed(f"not ready: {'; '.join(failing)}")
    return "alive and ready"


def check_token(settings: Settings) -> str:
    if not settings.api.token:
        raise CheckFailed("[api] token is empty: every data request is refused")
    status, body = _get(settings, "/api/v1/patients?limit=1", settings.api.token)
    if status in (401, 403):
        raise CheckFailed(f"the configured token was refused ({status})")
    if status != 200:  # accepted, but the request failed (a lost store file): the daemon's reason
        try:
            detail = str(json.loads(body).get("detail", ""))
        except ValueError:
            detail = ""
        raise CheckFailed(f"accepted, but the daemon answered {status}: {detail or 'no reason given'}")
    return "accepted"


CHECKS: list[Check] = [
    ("store reachable and up to date", check_store),
    ("TLS certificate", check_tls),
    ("listen addresses", check_exposure),
    ("image folder writable", check_image_folder),
    ("VDDS exchange folder writable", check_exchange_folder),
    ("PMS profile folders writable", check_profile_folders),
    ("DICOM import folders readable", check_import_folders),
    ("pushes to PMSs (outbox)", check_outbox),
    ("VDDS registration in VDDS_MMI.INI", vdds_register.check),
    ("daemon answering", check_daemon),
    ("API token", check_token),
]


def run_checks(config: str | None) -> int:
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print(f"FAIL config: {exc}")
        return EXIT_NO_CONFIG
    print(f"ok   config: {settings.path}")
    failed = 0
    for title, check in CHECKS:
        try:
            print(f"ok   {title}: {check(settings)}")
        except CheckWarning as exc:
            print(f"WARN {title}: {exc}")
        except CheckFailed as exc:
            failed += 1
            print(f"FAIL {title}: {exc}")
        except Exception as exc:  # a check must report, never crash the checklist
            failed += 1
            print(f"FAIL {title}: {type(exc).__name__}: {exc}")
    return EXIT_CHECK_FAILED if failed else 0
