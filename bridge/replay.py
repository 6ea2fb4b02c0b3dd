"""`pms-bridge replay SAMPLES_DIR`: run captured PMS messages and compare answers and store effects.

The case layout and the normalisation rules are documented in `samples/README.md`. By default every case
runs against a fresh temporary store with a real daemon (in this process, on loopback ports chosen by the
system) and the real `pms-bridge <protocol>` launch commands as subprocesses; with `--config` or `--url`
the cases run against a daemon that is already running.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import difflib
import fnmatch
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from protocols.common import AUTO, decode

# protocol -> [(regex, replacement)]: fields of that protocol's answers that legitimately vary. Each rule
# must name its field, so that nothing else is ignored.
PROTOCOL_NORMALISERS: dict[str, list[tuple[str, str]]] = {
    # REST answers carry the store's generated patient and image ids.
    "rest": [(r'"(id|patient_id|conflict_id)": \d+', r'"\1": {ID}')],
    # VDDS answers carry image ids (MMOID, and in the thumbnail and export file names) and one export
    # folder per MMOEXPORT request.
    "vdds": [
        (r"^MMOID=\d+(?=\r?$)", "MMOID={ID}"),
        (r"^(THUMBNAIL=.*[\\/])\d+(\.jpg)(?=\r?$)", r"\1{ID}\2"),
        (r"^(MMOID\d+=.*[\\/])x[0-9a-f]{12}([\\/])\d+(\.\w+)(?=\r?$)", r"\1{EXPORT}\2{ID}\3"),
    ],
    # OPP web answers: the store's ids (JSON keys, XML attributes) and the signed, expiring thumbnail URLs.
    "oppweb": [
        (r'"(id|patient_id|conflict_id)": \d+', r'"\1": {ID}'),
        (r'\b(id|patientId)="\d+"', r'\1="{ID}"'),
        (r'("(?:study|series|sop_instance)_uid": "|\b(?:study|series)Uid=")2\.25\.\d+', r"\1{UID}"),
        (r"https?://[^/\"]+/opp/thumbnails/\d+\.jpg\?exp=\d+&(?:amp;)?sig=[\w-]+", "{THUMBNAIL_URL}"),
    ],
}

# protocol -> code page its answer files are read with when they carry no BOM.
PROTOCOL_CODEPAGES: dict[str, str] = {
    "vdds": AUTO,  # as `[vdds] encoding = auto` reads them: BOM-less UTF-8 is UTF-8, else cp1252
    # the US launch formats, as their profiles' default `encoding = auto` reads them (record mode must
    # see the names the parser saw, or a BOM-less UTF-8 name escapes redaction)
    "dexis": AUTO,
    "dentrix": AUTO,
    "eaglesoft": AUTO,
    "cliniview": AUTO,
    "opp": "utf-8",  # OPP XML without BOM or declaration is UTF-8 (record mode reads captures with it)
    "opp_web": "utf-8",  # the OPP web listener's raw requests, as record mode captures them
}

ISO_TIMESTAMP = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})?"
FOLDER_TIMEOUT = 15.0


class CaseError(Exception):
    """The case itself is malformed (a missing file, an unknown transport)."""


@dataclass
class Case:
    name: str
    folder: Path
    protocol: str
    spec: dict[str, Any]
    problem: str = ""  # why case.json cannot be read: the case is an ERROR row, the others still run

    def inside(self, name: str) -> Path:
        """The file `name` of this case, which may not exist yet (--update writes it); a name that
        leads outside the case folder is a malformed case, never a file read or written there."""
        path = (self.folder / name).resolve()
        if self.folder.resolve() not in path.parents:
            raise CaseError(f"{name!r} is outside the case folder")
        return path

    def path(self, name: str) -> Path:
        """The existing file `name` of this case."""
        path = self.inside(name)
        if not path.exists():
            raise CaseError(f"{name} is missing")
        return path


def plain_name(name: str) -> str:
    """`name` when it is one plain file name: a step's `name` is where the request is written (the
    case's temporary folder, a watched folder), so a path in it ('../x', '/etc/x', 'C:x') would write
    outside that folder."""
    if name in ("", ".", "..") or any(ch in name for ch in "/\\:\0"):
        raise CaseError(f"name {name!r} is not a plain file name")
    return name


@dataclass
class Result:
    case: str
    result: str  # pass | FAIL | n/a | ERROR
    difference: str = ""


@dataclass
class Target:
    """The daemon a case runs against."""

    api_url: str
    token: str
    config: Path | None
    opp_url: str = ""
    home: Path | None = None
    watched: dict[str, Path] = field(default_factory=dict)
    fresh: bool = False


def discover(root: Path, pattern: str = "*") -> list[Case]:
    """Every folder under `root` holding a case.json, as cases named by their relative path.

    A case.json that is not a JSON object gives a case with a `problem` rather than an exception: one
    broken case among a vendor's captures is reported, and the others still run."""
    cases = []
    for spec_file in sorted(root.rglob("case.json")):
        folder = spec_file.parent
        name = folder.relative_to(root).as_posix() if folder != root else folder.name
        if not fnmatch.fnmatch(name, pattern):
            continue
        problem = ""
        try:
            spec = json.loads(spec_file.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            spec, problem = {}, f"case.json: {exc}"
        if not isinstance(spec, dict):
            spec, problem = {}, "case.json: not a JSON object"
        protocol = spec.get("protocol") or (name.split("/")[0] if "/" in name else root.name)
        cases.append(Case(name, folder, protocol, spec, problem))
    return cases


# --------------------------------------------------------------------------------------------------
# Normalisation and comparison


def normaliser(case: Case, target: Target, workdir: Path) -> Callable[[str], str]:
    rules: list[tuple[str, str]] = []
    for path, placeholder in ((target.home, "{HOME}"), (workdir, "{CASE}")):
        if path is not None:
            for form in {str(path), path.as_posix(), str(path).replace("/", "\\")}:
                rules.append((re.escape(form), placeholder))
    rules.append((ISO_TIMESTAMP, "{TIMESTAMP}"))
    rules += PROTOCOL_NORMALISERS.get(case.protocol, [])
    # A recorded session mixes transports: its OPP web answers carry generated ids and signed URLs too.
    steps = case.spec.get("steps", [])
    if case.protocol != "oppweb" and any(step.get("listener") == "opp_web" for step in steps):
        rules += PROTOCOL_NORMALISERS["oppweb"]
    rules += [(a, b) for a, b in case.spec.get("normalise", [])]
    compiled = [(re.compile(a, re.MULTILINE), b) for a, b in rules]

    def apply(text: str) -> str:
        for regex, replacement in compiled:
            text = regex.sub(replacement, text)
        return text

    return apply


def first_difference(expected: str, actual: str) -> str:
    """The first differing lines ("-expected | +actual"), readable in one table cell."""
    changed = [
        line
        for line in difflib.unified_diff(expected.splitlines(), actual.splitlines(), n=0, lineterm="")
        if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))
    ]
    first_minus = next((ln for ln in changed if ln.startswith("-")), "")
    first_plus = next((ln for ln in changed if ln.startswith("+")), "")
    return " | ".join(x for x in (first_minus, first_plus) if x) or "texts differ in trailing white space"


def compare_file(
    case: Case, expected_name: str, actual: bytes, norm: Callable[[str], str], update: bool
) -> str:
    """'' when the answer matches the expected file (after normalisation), else the first difference."""
    codepage = PROTOCOL_CODEPAGES.get(case.protocol, "utf-8")
    got = decode(actual, codepage)
    actual_text = norm(got.text)
    if update:
        case.inside(expected_name).write_bytes(got.encode(actual_text))
        return ""
    want = decode(case.path(expected_name).read_bytes(), codepage)
    if (want.encoding, want.bom, want.newline) != (got.encoding, got.bom, got.newline):
        return (
            f"{expected_name}: written as {got.encoding}{' with BOM' if got.bom else ''} {got.newline!r}, "
            f"expected {want.encoding}{' with BOM' if want.bom else ''} {want.newline!r}"
        )
    expected_text = norm(want.text)
    if expected_text != actual_text:
        return f"{expected_name}: {first_difference(expected_text, actual_text)}"
    return ""


# --------------------------------------------------------------------------------------------------
# Running steps


class Runner:
    """Runs cases against one target; `session` is an aiohttp client session."""

    def __init__(self, target: Target, session: aiohttp.ClientSession, *, update: bool = False) -> None:
        self.target = target
        self.session = session
        self.update = update

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.target.token}"}

    async def run_case(self, case: Case) -> Result:
        if (case.spec.get("settings") or case.spec.get("fresh")) and not self.target.fresh:
            return Result(case.name, "n/a", "needs a fresh store (settings, image ids): replay it on one")
        workdir = Path(tempfile.mkdtemp(prefix="replay-"))
        try:
            norm = normaliser(case, self.target, workdir)
            for step in case.spec.get("given", []):
                problem = await self.run_step(case, step, workdir, norm, compare=False)
                if problem:
                    return Result(case.name, "ERROR", f"given step failed: {problem}")
            for index, step in enumerate(case.spec.get("steps", [])):
                problem = await self.run_step(case, step, workdir, norm, compare=True)
                if problem:
                    prefix = f"step {index + 1}: " if len(case.spec.get("steps", [])) > 1 else ""
                    return Result(case.name, "FAIL", prefix + problem)
            if case.spec.get("effect"):
                problem = await self.settled_effect(
                    case, json.loads(case.path(case.spec["effect"]).read_text("utf-8"))
                )
                if problem:
                    return Result(case.name, "FAIL", f"effect: {problem}")
            return Result(case.name, "pass")
        except CaseError as exc:
            return Result(case.name, "ERROR", f"bad case: {exc}")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    async def run_step(
        self, case: Case, step: dict[str, Any], workdir: Path, norm: Callable[[str], str], *, compare: bool
    ) -> str:
        """Run one step; '' when it went as expected, else the first difference.

        Steps under test are compared (or, with --update, their expected answers rewritten); `given`
        steps only have to succeed.
        """
        transport = step.get("transport", "cli")
        handler = {
            "cli": self.step_cli,
            "http": self.step_http,
            "folder": self.step_folder,
            "api": self.step_api,
            "upload": self.step_upload,
        }.get(transport)
        if handler is None:
            raise CaseError(f"unknown transport {transport!r}")
        mode = ("update" if self.update else "compare") if compare else "given"
        return await handler(case, step, workdir, norm, mode)

    async def step_cli(
        self, case: Case, step: dict[str, Any], workdir: Path, norm: Callable[[str], str], mode: str
    ) -> str:
        protocol = step.get("protocol", case.protocol)
        copy = None
        if step.get("file"):
            source = case.path(step["file"])
            copy = workdir / plain_name(step.get("name") or source.name)
            shutil.copyfile(source, copy)
        for name in step.get("copy", []):  # further files the arguments name, e.g. a client config
            shutil.copyfile(case.path(name), workdir / Path(name).name)
        args = [
            a.replace("{file}", str(copy) if copy else "").replace("{case}", str(workdir))
            for a in step.get("args", ["{file}"] if copy else [])
        ]
        config = self.target.config
        assert config is not None
        env = {**(clean_environ() if self.target.fresh else os.environ), "PMS_BRIDGE_CONFIG": str(config)}
        proc = await asyncio.create_subprocess_exec(
            *launch_command(),
            protocol,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        out, err = await proc.communicate()
        output = (out + err).decode("utf-8", "replace").strip()
        expect = step.get("expect", {})
        if mode == "given":
            return "" if proc.returncode == expect.get("exit", 0) else f"exit {proc.returncode}: {output}"
        problems = []
        if "exit" in expect and proc.returncode != expect["exit"]:
            problems.append(f"exit code {proc.returncode}, expected {expect['exit']} ({output[:200]})")
        if "output" in expect and expect["output"] not in norm(output):
            problems.append(f"output {output[:200]!r} lacks {expect['output']!r}")
        if "file" in expect:
            if copy is None:
                raise CaseError("expect.file needs a request file")
            diff = compare_file(case, expect["file"], copy.read_bytes(), norm, mode == "update")
            if diff:
                problems.append(diff)
        return "; ".join(problems)

    async def step_http(
        self, case: Case, step: dict[str, Any], workdir: Path, norm: Callable[[str], str], mode: str
    ) -> str:
        listener = step.get("listener", "api")
        base = self.target.opp_url if listener == "opp_web" else self.target.api_url
        raw = case.path(step["request"]).read_bytes().replace(b"{token}", self.target.token.encode())
        method, path, headers, body = parse_raw_http(raw)
        url = target_url(base, path)
        async with self.session.request(method, url, headers=headers, data=body or None) as response:
            payload = await response.read()
            status = response.status
            reply_headers = dict(response.headers)
        expect = step.get("expect", {})
        problems = []
        if "status" in expect and status != expect["status"]:
            problems.append(f"status {status}, expected {expect['status']}: {payload[:200]!r}")
        if mode == "given":
            return "; ".join(problems)
        for name, value in expect.get("headers", {}).items():
            if reply_headers.get(name) != value:
                problems.append(f"header {name}: {reply_headers.get(name)!r}, expected {value!r}")
        if "body" in expect:
            diff = compare_file(case, expect["body"], payload, norm, mode == "update")
            if diff:
                problems.append(diff)
        return "; ".join(problems)

    async def step_folder(
        self, case: Case, step: dict[str, Any], workdir: Path, norm: Callable[[str], str], mode: str
    ) -> str:
        watcher = step.get("watcher", case.protocol)
        folder = self.target.watched.get(watcher)
        if folder is None:
            raise CaseError(f"no watched folder {watcher!r} on this target")
        source = case.path(step["file"])
        target_file = folder / plain_name(step.get("name") or source.name)
        data = source.read_bytes()
        tmp = folder / f".{target_file.name}.replay-tmp"
        tmp.write_bytes(data)
        tmp.replace(target_file)
        expect = step.get("expect", {})
        deadline = time.monotonic() + FOLDER_TIMEOUT
        answer = data
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            try:
                answer = target_file.read_bytes()
            except FileNotFoundError:  # consumed by the daemon (formats without an answer file)
                break
            if "file" not in expect or answer != data:
                if "file" not in expect:
                    await asyncio.sleep(step.get("settle", 1.5))
                break
        if "file" in expect and mode != "given":
            return compare_file(case, expect["file"], answer, norm, mode == "update")
        return ""

    async def step_api(
        self, case: Case, step: dict[str, Any], workdir: Path, norm: Callable[[str], str], mode: str
    ) -> str:
        async with self.session.request(
            step.get("method", "GET"),
            target_url(self.target.api_url, step["path"]),
            json=step.get("json"),
            headers=self.auth,
        ) as response:
            body = await response.text()
            expected = step.get("expect", {}).get("status")
            if expected is not None and response.status != expected:
                return f"{step['path']}: status {response.status}, expected {expected}: {body[:200]}"
        return ""

    async def step_upload(
        self, case: Case, step: dict[str, Any], workdir: Path, norm: Callable[[str], str], mode: str
    ) -> str:
        patient = await self.find_patient(step["patient"])
        if isinstance(patient, str):
            return patient
        form = aiohttp.FormData()
        for name in step.get("files", []):
            form.add_field("file", case.path(name).read_bytes(), filename=name)
        for key, value in step.get("fields", {}).items():
            form.add_field(key, str(value))
        url = f"{self.target.api_url}/api/v1/patients/{patient['id']}/images"
        async with self.session.post(url, data=form, headers=self.auth) as response:
            if response.status != 201:
                return f"upload: status {response.status}: {(await response.text())[:200]}"
        return ""

    async def find_patient(self, key: dict[str, str]) -> dict[str, Any] | str:
        found = await self.patients_by_key(key)
        if len(found) != 1:
            return f"{len(found)} patients with key {key}, expected exactly one"
        return found[0]

    async def patients_by_key(self, key: dict[str, str]) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode(
            {k: v for k, v in key.items() if k in ("pms_system", "pms_id", "chart_number")}
        )
        async with self.session.get(
            f"{self.target.api_url}/api/v1/patients?{query}", headers=self.auth
        ) as response:
            items: list[dict[str, Any]] = (await response.json())["items"]
        if "practice_id" in key:
            items = [p for p in items if p.get("practice_id") == key["practice_id"]]
        return items

    async def settled_effect(self, case: Case, effect: dict[str, Any]) -> str:
        """The effect check, repeated until it holds when a folder step has no answer to wait for.

        A watched folder without an answer file (Dexis Integrator) handles the file whenever its next
        scan finds it complete; its effect is awaited up to FOLDER_TIMEOUT instead of guessed at.
        """
        waits = any(
            step.get("transport") == "folder" and "file" not in step.get("expect", {})
            for step in case.spec.get("steps", [])
        )
        deadline = time.monotonic() + (FOLDER_TIMEOUT if waits else 0)
        while True:
            problem = await self.check_effect(case, effect)
            if not problem or time.monotonic() >= deadline:
                return problem
            await asyncio.sleep(0.2)

    async def check_effect(self, case: Case, effect: dict[str, Any]) -> str:
        for expected in effect.get("patients", []):
            key = expected["key"]
            found = await self.patients_by_key(key)
            if len(found) != 1:
                return f"{len(found)} patients with key {key}, expected 1"
            patient = found[0]
            for name, want in expected.items():
                if name == "key":
                    continue
                if name == "images":
                    url = f"{self.target.api_url}/api/v1/patients/{patient['id']}/images?limit=500"
                    async with self.session.get(url, headers=self.auth) as response:
                        got: Any = len((await response.json())["items"])
                else:
                    got = patient.get(name)
                if got != want:
                    return f"patient {key}: {name} is {got!r}, expected {want!r}"
        for key in effect.get("absent", []):
            found = await self.patients_by_key(key)
            if found:
                return f"patient {key} exists, expected none"
        if "conflicts" in effect:
            async with self.session.get(
                f"{self.target.api_url}/api/v1/conflicts?limit=500", headers=self.auth
            ) as r:
                conflicts = (await r.json())["items"]
            keys = {c.get("pms_id") for c in effect["conflicts"]} | {
                k["key"].get("pms_id") for k in effect.get("patients", [])
            }
            got_pairs = sorted((c["kind"], c["pms_id"]) for c in conflicts if c["pms_id"] in keys)
            want_pairs = sorted((c["kind"], c["pms_id"]) for c in effect["conflicts"])
            if got_pairs != want_pairs:
                return f"conflicts {got_pairs}, expected {want_pairs}"
        return ""


def target_url(base: str, path: Any) -> URL:
    """`path` (a request line's target, an api step's `path`) on the daemon at `base`, or CaseError.

    A case comes from whoever captured it, and its requests are sent with the daemon's token (in the
    Authorization header, and wherever the case writes `{token}`). So a path must be a path on the
    target: it must start with "/", and the joined URL must keep the target's scheme, host and port.
    Pasted onto the base as text, `@evil:80/x` made `http://127.0.0.1:4435@evil:80/x`, whose host is
    `evil` (the target's address became a user name), and the token went there.
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise CaseError(f"request path {str(path)[:80]!r} does not start with '/'")
    origin = URL(base)
    try:
        url = origin.join(URL(path))
    except ValueError as exc:
        raise CaseError(f"request path {path[:80]!r} is not a URL path ({exc})") from None
    if (url.scheme, url.host, url.port) != (origin.scheme, origin.host, origin.port):
        raise CaseError(f"request path {path[:80]!r} leads to {url.origin()}, not to the daemon at {origin}")
    return url


def parse_raw_http(raw: bytes) -> tuple[str, str, dict[str, str], bytes]:
    """(method, path, headers, body) of a raw HTTP request file (CRLF or LF line ends)."""
    text_end = raw.find(b"\r\n\r\n")
    sep = 4
    if text_end < 0:
        text_end, sep = raw.find(b"\n\n"), 2
    if text_end < 0:
        text_end, sep = len(raw), 0
    head = raw[:text_end].decode("latin-1").replace("\r\n", "\n").split("\n")
    method, path = head[0].split(" ")[:2]
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() not in ("content-length", "host"):
            headers[name.strip()] = value.strip()
    return method, path, headers, raw[text_end + sep :]


def clean_environ() -> dict[str, str]:
    """This process's environment without any pms-bridge configuration (`PMS_BRIDGE_CONFIG`,
    `PMS_BRIDGE__<SECTION>__<KEY>`): a fresh replay's launch commands must read the replay's own config
    only, or an override meant for the practice's daemon (its store, its API) would send them there."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PMS_BRIDGE__", "PMS_BRIDGE_CONFIG"))}


def launch_command() -> list[str]:
    """The `pms-bridge` launch command a PMS would start (the console script beside this interpreter)."""
    script = Path(sys.executable).with_name("pms-bridge.exe" if os.name == "nt" else "pms-bridge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bridge"]


# --------------------------------------------------------------------------------------------------
# Fresh targets


async def fresh_target_run(case: Case, session: aiohttp.ClientSession, update: bool) -> Result:
    """Run one case against a new store and an in-process daemon on free loopback ports."""
    from bridge.config import settings_from_raw, watched_folders
    from bridge.config_file import read_raw
    from bridge.daemon import Daemon
    from bridge.install import create_watched_folders

    home = Path(tempfile.mkdtemp(prefix="replay-home-")).resolve()
    try:
        config = write_fresh_config(home, case.spec.get("settings", {}))
        # No environment overrides: PMS_BRIDGE__STORE__URL set for the practice's daemon must not turn
        # the temporary store into the real one.
        settings = settings_from_raw(read_raw(str(config), environ={}), config)
        # as init does (the daemon does not create them); mkdir off the event loop
        await asyncio.to_thread(create_watched_folders, settings, home)
        daemon = Daemon(settings)
        await daemon.start()
        try:
            host, port = daemon.bound["api"]
            opp = daemon.bound.get("opp_web")
            target = Target(
                api_url=f"http://{host}:{port}",
                token=settings.api.token,
                config=config,
                opp_url=f"http://{opp[0]}:{opp[1]}" if opp else "",
                home=home,
                watched={folder.watcher: folder.path for folder in watched_folders(settings)},
                fresh=True,
            )
            return await Runner(target, session, update=update).run_case(case)
        finally:
            await daemon.shutdown()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def free_ports(count: int) -> list[int]:
    """`count` different loopback ports nobody listens on right now. The probe sockets stay bound until
    all are chosen: closed one by one, the kernel may offer a port just closed again, and the fresh
    daemon's API and OPP web listeners then collided ("already in use")."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def write_fresh_config(home: Path, overrides: dict[str, dict[str, Any]]) -> Path:
    """A config for a fresh store under `home`: free loopback ports, a token, a VDDS_MMI.INI of its own
    (none), the case's overrides."""
    token = base64.urlsafe_b64encode(os.urandom(18)).decode()
    api_port, opp_web_port = free_ports(2)
    sections: dict[str, dict[str, Any]] = {
        "store": {
            "url": f"sqlite:///{(home / 'bridge.db').as_posix()}",
            "images": (home / "images").as_posix(),
        },
        "api": {"port": api_port, "token": token},
        "opp_web": {"port": opp_web_port},
        "daemon": {"log_level": "warning", "stop_file": (home / "stop").as_posix()},
        # VDDS push (on by default) reads the registry of PMS programs from VDDS_MMI.INI and starts the
        # PMS's MMOINFIMPORT program for each new image: the machine's own registry would start the
        # practice's real PMS from a replay. A case that tests pushes names its own file under {HOME}.
        "vdds": {"mmi_ini": (home / "VDDS_MMI.INI").as_posix()},
    }
    for section, keys in overrides.items():
        sections.setdefault(section, {}).update(
            {k: str(v).replace("{HOME}", home.as_posix()) for k, v in keys.items()}
        )
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in keys.items()]
    config = home / "pms-bridge.ini"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


# --------------------------------------------------------------------------------------------------
# Entry point


async def replay(
    samples: Path,
    *,
    pattern: str = "*",
    config: Path | None = None,
    url: str | None = None,
    token: str = "",
    opp_url: str = "",
    update: bool = False,
) -> list[Result]:
    cases = discover(samples, pattern)
    results = []
    async with aiohttp.ClientSession() as session:
        running: Target | None = None
        if config is not None or url is not None:
            running = running_target(config, url, token, opp_url)
        for case in cases:
            if case.problem:
                result = Result(case.name, "ERROR", f"bad case: {case.problem}")
            elif running is not None:
                result = await Runner(running, session, update=update).run_case(case)
            else:
                result = await fresh_target_run(case, session, update)
            results.append(result)
    return results


def running_target(config: Path | None, url: str | None, token: str, opp_url: str) -> Target:
    from bridge.config import load_settings, watched_folders

    if config is not None:
        settings = load_settings(str(config))
        api = settings.api
        host = "127.0.0.1" if api.host in ("0.0.0.0", "::") else api.host  # noqa: S104
        scheme = "https" if api.tls else "http"
        return Target(
            api_url=url or f"{scheme}://{host}:{api.port}",
            token=token or api.token,
            config=config,
            opp_url=opp_url or f"{scheme}://{host}:{settings.opp_web.port}",
            home=settings.home,
            watched={folder.watcher: folder.path for folder in watched_folders(settings)},
        )
    assert url is not None
    home = Path(tempfile.mkdtemp(prefix="replay-client-"))
    parsed = urllib.parse.urlsplit(url)
    client_config = home / "pms-bridge.ini"
    client_config.write_text(
        f"[api]\nhost = {parsed.hostname}\nport = {parsed.port or 80}\ntoken = {token}\n", encoding="utf-8"
    )
    return Target(
        api_url=url.rstrip("/"),
        token=token,
        config=client_config,
        opp_url=opp_url or f"{parsed.scheme}://{parsed.hostname}:4435",
    )


def print_table(results: list[Result]) -> None:
    width = max([len(r.case) for r in results] + [4])
    print(f"{'case':<{width}}  result  first difference")
    for r in results:
        print(f"{r.case:<{width}}  {r.result:<6}  {r.difference}")
    counts = {k: sum(1 for r in results if r.result == k) for k in ("pass", "FAIL", "ERROR", "n/a")}
    print(", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no cases")
