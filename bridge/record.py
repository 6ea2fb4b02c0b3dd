"""Record mode: the daemon saves every incoming PMS message and its answer as a replayable case.

With `[record] dir` set, each daemon run writes one session case, `<dir>/session-<start>-<id>/`, in the
samples layout (`samples/README.md`): one step per message in arrival order (launch commands, watched
files, OPP web requests, REST calls and uploads), the answer each got, and the store's state of the
patients touched (effect.json). `pms-bridge replay <dir>` replays it against a fresh store.

PHI is pseudonymised on the way in (`bridge.redact`) unless `[record] redact = no`: names, birth dates,
ids, addresses and SSNs learned from each parsed request are replaced in every file of the capture,
consistently, so the session still replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.atomic import write_atomic
from bridge.model import Outcome, PatientRequest, PatientView, Status
from bridge.redact import Redactor, date_format_forms
from protocols.common import LOCALE_SHORT_DATES, decode, split_lines
from protocols.opp import split_flags

if TYPE_CHECKING:
    from bridge.handlers.base import Launch, LaunchReply
    from bridge.runtime import Runtime

log = logging.getLogger(__name__)

# Words of PMS message formats (flags, commands, codes), never personal data.
_NOT_PHI = frozenset(
    {
        *("YES", "NO", "TRUE", "FALSE", "MALE", "FEMALE", "UNKNOWN", "OTHER"),
        *("UPDATE", "UPDATE_CREATE", "ACQUIRE", "VIEW", "VIEW_DATA", "UTF-8", "XML"),
    }
)

# Images counted per patient in effect.json (replay's effect check reads as many).
EFFECT_IMAGE_LIMIT = 500

# Sections whose non-path keys shape answers, copied into the session so it replays the same way.
NOT_REPLAYED_SECTIONS = {"store", "api", "opp_web", "daemon", "record"}


def option_parts(protocol: str, args: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """Each argument as (option flag, value): OPP's flag form (`protocols.opp.split_flags`) reads `-p 0815`
    and `-p0815` alike, so a value attached to its flag is PHI to learn and redact without the flag.
    Other protocols' arguments are values as a whole."""
    if protocol != "opp":
        return [("", arg) for arg in args]
    return [(flag, value or "") for flag, value in split_flags(args)]


def _ini_value(value: Any, parser: Any) -> str | None:
    if parser.render is not None:
        return str(parser.render(value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return ", ".join(value)
    return None  # paths and unset values belong to the recording machine


def configured_date_formats(settings: Any) -> list[str]:
    """The date forms the configuration makes PMSs write (CLINIVIEW's .NET formats, a Dexis or
    Patterson locale's short date), which the redactor must know to find the dates in that traffic."""
    forms: list[str] = []
    for fld in dataclasses.fields(settings):
        section = getattr(settings, fld.name)
        if not dataclasses.is_dataclass(section):
            continue
        for key in dataclasses.fields(section):
            value = getattr(section, key.name)
            if key.name.endswith("date_format") and isinstance(value, str):
                forms += date_format_forms(value)
            elif key.name == "locale" and isinstance(value, str):
                forms += LOCALE_SHORT_DATES.get(value.lower(), ())
    return forms


def declared_date_formats(texts: Iterable[str]) -> list[str]:
    """The date forms a message declares (OPP `-d dd-MM-yyyy`, `dateFormat="yyyy.MM.dd"`)."""
    forms: list[str] = []
    for text in texts:
        for candidate in re.findall(r"(?<![A-Za-z])[dMy][dMy./-]*[dMy](?![A-Za-z])", text):
            forms += date_format_forms(candidate)
    return forms


class Recorder:
    """Writes one session case for this daemon run; every method is safe to call concurrently."""

    def __init__(self, rt: Runtime, folder: Path, *, redact: bool) -> None:
        self.rt = rt
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        self.session_dir = folder / f"session-{stamp}-{secrets.token_hex(3)}"
        self.redactor: Redactor | None = Redactor() if redact else None
        if self.redactor is not None:
            self.redactor.learn_formats(configured_date_formats(rt.settings))
        self._steps: list[dict[str, Any]] = []
        self._keys: list[dict[str, str]] = []
        self._lock = asyncio.Lock()

    # --------------------------------------------------------------------------------------------
    # What is sensitive

    def learn(
        self, request: PatientRequest | None, outcome: Outcome | None, extra: tuple[str, ...] = ()
    ) -> None:
        """Teach the redactor the PHI of one message: from the request, the patient it touched, extras."""
        if self.redactor is None:
            return
        if request is not None:
            demo = request.demographics
            self.redactor.learn_all(
                [
                    ("id", request.pms_id),
                    ("id", request.chart_number),
                    ("name", demo.last_name),
                    ("name", demo.first_name),
                    ("name", demo.middle_name),
                    ("address", demo.street),
                    ("address", demo.city),
                    ("address", demo.postal_code),
                    ("address", demo.phone),
                    ("address", demo.email),
                ]
            )
            self.redactor.learn_date(demo.birth_date)
        patient = outcome.patient if outcome is not None else None
        if patient is not None:
            self._learn_patient(patient)
        self.redactor.learn_all(("other", value) for value in extra)

    def learn_declared_formats(self, content: bytes, protocol: str, args: tuple[str, ...] = ()) -> None:
        """The date formats a message declares, learned before its dates (which read in them)."""
        if self.redactor is None:
            return
        from bridge.replay import PROTOCOL_CODEPAGES

        text = decode(content, PROTOCOL_CODEPAGES.get(protocol, "cp1252")).text if content else ""
        self.redactor.learn_formats(declared_date_formats([text, *args]))

    def learn_unparsed(self, content: bytes, protocol: str, args: tuple[str, ...] = ()) -> None:
        """A message the bridge could not parse tells nothing about which of its values are PHI: then
        every value in it is treated as PHI (INI values, XML attribute values and text, arguments), so the
        capture keeps its structure (and its refusal replays) without its data."""
        if self.redactor is None:
            return
        from bridge.replay import PROTOCOL_CODEPAGES

        text = decode(content, PROTOCOL_CODEPAGES.get(protocol, "cp1252")).text if content else ""
        values = [line.partition("=")[2] for line in split_lines(text) if "=" in line]
        values += re.findall(r'"([^"<>]*)"', text) + re.findall(r">([^<>]+)<", text)
        values += [value for _flag, value in option_parts(protocol, args)]
        # The message's structure is not PHI: its key, tag and attribute names, enumerations, small numbers,
        # option flags (-p) and date formats (dd.MM.yyyy). Learned, they would be replaced in every later
        # message of the capture, which then means something else (-p 0815 turned into -m 0815).
        structure = {m.upper() for m in re.findall(r"([A-Za-z_][\w.-]*)\s*=", text)}
        structure |= {m.upper() for m in re.findall(r"</?([A-Za-z_][\w.-]*)", text)} | _NOT_PHI
        for value in values:
            if date_format_forms(value.strip()):
                continue
            for token in re.findall(r"[^\s;,=&<>\"'/()]+", value):
                small_number = len(token) <= 3 and token.replace(".", "").isdigit()
                flag = re.fullmatch(r"-[A-Za-z]", token) is not None
                if (
                    any(ch.isalnum() for ch in token)
                    and token.upper() not in structure
                    and not (small_number or flag or date_format_forms(token))
                ):
                    self.redactor.learn_text("other", token)

    def _learn_patient(self, patient: PatientView) -> None:
        assert self.redactor is not None
        self.redactor.learn_all(
            [
                ("id", patient.pms_id or ""),
                ("id", patient.chart_number or ""),
                ("name", patient.last_name),
                ("name", patient.first_name),
                ("name", patient.middle_name),
                ("address", patient.street),
                ("address", patient.city),
                ("address", patient.postal_code),
                ("address", patient.phone),
                ("address", patient.email),
            ]
        )
        self.redactor.learn_date(patient.birth_date)

    def text(self, value: str) -> str:
        return self.redactor.apply(value) if self.redactor else value

    def data(self, content: bytes, protocol: str) -> bytes:
        """Bytes of a PMS file as the capture keeps them: PHI replaced (unless unredacted) and the
        daemon's home folder written as {HOME} (where the replay's own home goes), in the file's own
        encoding, BOM and line endings."""
        if not content:
            return content
        from bridge.replay import PROTOCOL_CODEPAGES

        decoded = decode(content, PROTOCOL_CODEPAGES.get(protocol, "cp1252"))
        text = self.redactor.apply(decoded.text) if self.redactor else decoded.text
        home = self.rt.settings.home
        for form in sorted({str(home), home.as_posix(), str(home).replace("/", "\\")}, key=len, reverse=True):
            text = text.replace(form, "{HOME}")
        return decoded.encode(text)

    def _args(self, protocol: str, args: list[str]) -> list[str]:
        """A launch command's arguments as the capture keeps them.

        OPP: a value attached to its flag (-lBrandt) is redacted apart from the flag. Other protocols'
        handlers (CLINIVIEW, Dexis) join their arguments with spaces again, because Windows splits at the
        spaces a PMS left in (`-5479;Mary`, `Ann;Van`, `Der`, `Berg;;11/21/1976`): a name then spans
        arguments, so they are redacted joined and split again at the same spaces (pseudonyms keep
        them), which hides the name pieces and keeps the pieces of one name consistent for the replay.
        """
        if protocol == "opp":
            return [flag + self.text(value) for flag, value in option_parts(protocol, args)]
        pieces = self.text(" ".join(args)).split(" ")
        sizes = [arg.count(" ") + 1 for arg in args]
        if len(pieces) != sum(sizes):  # a pseudonym without the spaces of its original: one by one
            return [self.text(arg) for arg in args]
        out, start = [], 0
        for size in sizes:
            out.append(" ".join(pieces[start : start + size]))
            start += size
        return out

    def _json(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self._json(v) for v in value]
        if isinstance(value, dict):
            return {k: self._json(v) for k, v in value.items()}
        return value

    # --------------------------------------------------------------------------------------------
    # Steps

    async def launch(self, launch: Launch, reply: LaunchReply) -> None:
        """A launch command (`pms-bridge <protocol> ...`): the file it named, its arguments, the answer."""
        self.learn_declared_formats(launch.content, launch.protocol, launch.args)
        self.learn(reply.request, reply.outcome, reply.phi)
        if reply.request is None:
            self.learn_unparsed(launch.content, launch.protocol, launch.args)
        async with self._lock:
            n = len(self._steps) + 1
            step: dict[str, Any] = {"transport": "cli", "protocol": launch.protocol}
            args = list(launch.args)
            if launch.filename:
                base = os.path.basename(launch.filename)
                suffix = os.path.splitext(base)[1] or ".bin"
                request_name = f"{n:03d}-request{suffix}"
                self._write(request_name, self.data(launch.content, launch.protocol))
                step["file"] = request_name
                step["name"] = self.text(base)
                args = [
                    "@{file}" if a == "@" + launch.filename else "{file}" if a == launch.filename else a
                    for a in args
                ]
                if reply.content is not None:
                    reply_name = f"{n:03d}-reply{suffix}"
                    self._write(reply_name, self.data(reply.content, launch.protocol))
                    step["expect"] = {"exit": reply.exit_code, "file": reply_name}
            step["args"] = self._args(launch.protocol, args)
            step.setdefault("expect", {"exit": reply.exit_code})
            await self._add(step, reply.outcome)

    async def folder(
        self, watcher: str, protocol: str, name: str, content: bytes, answer: bytes | None, reply: LaunchReply
    ) -> None:
        """A file dropped into `watcher`'s folder, and the answer written into it (if any)."""
        self.learn_declared_formats(content, protocol)
        self.learn(reply.request, reply.outcome, reply.phi)
        if reply.request is None:
            self.learn_unparsed(content, protocol)
        async with self._lock:
            n = len(self._steps) + 1
            suffix = os.path.splitext(name)[1] or ".bin"
            request_name = f"{n:03d}-request{suffix}"
            self._write(request_name, self.data(content, protocol))
            step: dict[str, Any] = {
                "transport": "folder",
                "watcher": watcher,
                "file": request_name,
                "name": self.text(name),
            }
            if answer is not None:
                reply_name = f"{n:03d}-reply{suffix}"
                self._write(reply_name, self.data(answer, protocol))
                step["expect"] = {"file": reply_name}
            await self._add(step, reply.outcome)

    async def http(
        self,
        listener: str,
        raw_request: bytes,
        status: int,
        body: bytes,
        *,
        request: PatientRequest | None = None,
        outcome: Outcome | None = None,
        suffix: str = ".txt",
    ) -> None:
        """A raw HTTP request to a listener (OPP web) and the answer's status and body."""
        self.learn_declared_formats(raw_request, listener)
        self.learn(request, outcome)
        if request is None:
            self.learn_unparsed(raw_request.partition(b"\r\n\r\n")[2], listener)
        async with self._lock:
            n = len(self._steps) + 1
            self._write(f"{n:03d}-request.http", self.data(raw_request, listener))
            step: dict[str, Any] = {
                "transport": "http",
                "listener": listener,
                "request": f"{n:03d}-request.http",
            }
            expect: dict[str, Any] = {"status": status}
            if body:
                self._write(f"{n:03d}-reply{suffix}", self.data(body, listener))
                expect["body"] = f"{n:03d}-reply{suffix}"
            step["expect"] = expect
            await self._add(step, outcome)

    async def api(
        self, method: str, path: str, body: dict[str, Any], status: int, outcome: Outcome | None
    ) -> None:
        """A REST call that changes the store (POST /api/v1/patients)."""
        self.learn(None, outcome)
        if self.redactor is not None:
            self.redactor.learn_all(
                ("name" if "name" in k else "id" if k.endswith("id") or k == "chart_number" else "other", v)
                for k, v in body.items()
                if isinstance(v, str) and k not in ("pms_system", "sex", "practice_id", "birth_date")
            )
            if isinstance(body.get("birth_date"), str):
                with contextlib.suppress(ValueError):  # the API refuses it; nothing to learn
                    self.redactor.learn_date(date.fromisoformat(body["birth_date"]))
        async with self._lock:
            step = {
                "transport": "api",
                "method": method,
                "path": path,
                "json": self._json(body),
                "expect": {"status": status},
            }
            await self._add(step, outcome)

    async def upload(
        self, patient: PatientView, files: list[tuple[str, bytes]], fields: dict[str, str]
    ) -> None:
        """Images uploaded for a patient: recorded so that later answers (image lists) replay the same."""
        self.learn(None, Outcome(Status.OK, patient=patient))
        async with self._lock:
            n = len(self._steps) + 1
            names = []
            for index, (filename, data) in enumerate(files, 1):
                suffix = os.path.splitext(filename)[1].lower() or ".bin"
                name = f"{n:03d}-image-{index}{suffix}"
                self._write(name, data)
                names.append(name)
            key = {"pms_system": patient.pms_system or "", "pms_id": self.text(patient.pms_id or "")}
            if not patient.pms_id and patient.chart_number:
                key = {"chart_number": self.text(patient.chart_number)}
            step = {"transport": "upload", "patient": key, "files": names, "fields": self._json(fields)}
            await self._add(step, Outcome(Status.OK, patient=patient))

    # --------------------------------------------------------------------------------------------
    # Writing the case

    def _write(self, name: str, data: bytes) -> None:
        self.session_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.session_dir / name, data)

    async def _add(self, step: dict[str, Any], outcome: Outcome | None) -> None:
        self._steps.append(step)
        patient = outcome.patient if outcome is not None else None
        if patient is not None and patient.pms_id:
            key = {"pms_system": patient.pms_system or "", "pms_id": patient.pms_id}
            if key not in self._keys:
                self._keys.append(key)
        effect = await self._effect()
        case = {
            "description": f"Session recorded {self.session_dir.name.split('-', 1)[1]}"
            + (" (PHI pseudonymised)" if self.redactor else " (UNREDACTED: keep on the practice's machine)"),
            "settings": self._settings(),
            "steps": self._steps,
            "effect": "effect.json",
        }
        self._write("effect.json", json.dumps(effect, ensure_ascii=False, indent=2).encode())
        self._write("case.json", json.dumps(case, ensure_ascii=False, indent=2).encode())
        log.info("recorded", extra={"session": self.session_dir.name, "step": len(self._steps)})

    async def _effect(self) -> dict[str, Any]:
        """The touched patients as the store holds them now (read without audit entries: this is the
        capture's bookkeeping, `BridgeService.recorded_state`)."""
        patients = []
        keys = [(key["pms_system"], key["pms_id"]) for key in self._keys]
        for p, images in await self.rt.service.recorded_state(keys, image_limit=EFFECT_IMAGE_LIMIT):
            patients.append(
                {
                    "key": {"pms_system": p.pms_system, "pms_id": self.text(p.pms_id or "")},
                    "last_name": self.text(p.last_name),
                    "first_name": self.text(p.first_name),
                    "birth_date": self._date(p.birth_date),
                    "sex": p.sex.value,
                    "chart_number": self.text(p.chart_number) if p.chart_number else None,
                    "images": images,
                }
            )
        return {"patients": patients}

    def _date(self, day: date | None) -> str | None:
        if day is None:
            return None
        if self.redactor is None:
            return day.isoformat()
        self.redactor.learn_date(day)
        return self.redactor.apply(day.isoformat())

    def _settings(self) -> dict[str, dict[str, str]]:
        settings: dict[str, dict[str, str]] = {}
        for fld in dataclasses.fields(self.rt.settings):
            if fld.name in NOT_REPLAYED_SECTIONS or not dataclasses.is_dataclass(
                getattr(self.rt.settings, fld.name)
            ):
                continue
            section = getattr(self.rt.settings, fld.name)
            values: dict[str, str | None] = {}
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if f.name.endswith("_dir") and isinstance(value, Path):
                    # a folder of the recording machine: the replay gets one of its own under its home
                    home = self.rt.settings.home
                    place = value.relative_to(home).as_posix() if value.is_relative_to(home) else None
                    values[f.name] = f"{{HOME}}/{place or fld.name + '-' + f.name}"
                else:
                    values[f.name] = _ini_value(value, f.metadata["parser"])
            kept = {k: v for k, v in values.items() if v is not None}
            if kept:
                settings[fld.name] = kept
        return settings
