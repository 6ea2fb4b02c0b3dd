"""The launch client: what runs when a PMS starts `pms-bridge vdds FILE` (or opp, cliniview, dexis ...).

A PMS waits on this process, so its start-up is part of the receptionist's wait: it imports only the
standard library's cheapest modules (no argparse, no asyncio, no HTTP library: a few lines of HTTP/1.1
over a socket are a fifth of the start-up cost of urllib), hands the message to the running daemon and
writes the answer back. When the daemon cannot be reached, the protocol still gets an answer: protocols
with an answer file (VDDS) get an error written into it by their `unreachable` renderer; all get a
non-zero exit code and one line on stderr.

Only the arguments in a protocol's file position are read as a file (`named_file`: the last ones for
VDDS, whose PVSs append the path to the registered command line, then the first; the first for the
others), and only a regular file. On POSIX an argument is bytes: one that is not UTF-8 arrives with
surrogate escapes. A file path like that is opened by its real bytes and shown escaped (`x\\xe9.txt`);
any other such argument is refused (exit 2) rather than sent with its letters guessed. Printing never
fails: what the stream's encoding cannot show is escaped, so the exit code always says what the daemon
did.
"""

from __future__ import annotations

import _socket  # the C module: socket.py's enums and selectors cost more start-up than this whole client
import os
import sys

from bridge.atomic import rewrite_head, write_atomic
from bridge.config_file import (
    LAUNCH_PATH,
    ConfigFileError,
    RawConfig,
    api_endpoint,
    config_home,
    find_config_path,
    read_raw,
)
from bridge.exits import ExitCode

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy takes it as true
if TYPE_CHECKING:
    import ssl
    from typing import TextIO

TIMEOUT_SECONDS = 120.0
MAX_FILE_BYTES = 4 * 1024 * 1024

# protocol -> "module:function(content: bytes, message: str, settings: dict[str, str]) -> bytes | None":
# the answer a protocol writes into the PMS's file when the daemon cannot answer; `settings` is the
# protocol's config section as raw strings (its answer language, code page), empty when the config could
# not be read. Imported only on that (rare) path.
UNREACHABLE_RENDERERS: dict[str, str] = {
    "vdds": "protocols.vdds_exchange:unreachable_answer",
}
# protocol -> "module:function(head: bytes, size: int, limit: int, settings: dict[str, str]) -> (bytes, int)":
# the protocol's answer to a message file of `size` bytes over the size limit whose first `limit` bytes are
# `head`: a new head, and the offset from which the file's own bytes follow it (`atomic.rewrite_head`).
TOO_LARGE_RENDERERS: dict[str, str] = {
    "vdds": "protocols.vdds_exchange:too_large_file_answer",
}


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take `--config FILE` / `--config=FILE` out of the arguments; the rest go to the daemon as they are."""
    rest: list[str] = []
    config: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return config, rest


# Protocols whose file is the last argument(s): the PMS appends the file's path to whatever command line
# is registered, and that may carry arguments of its own (VDDS: `NNT.exe -VDDS PATDATIMPORT <file>`,
# `pms-bridge vdds ACQUIRE <file>`). Every other protocol names its file first.
FILE_LAST = frozenset({"vdds"})


def named_file(protocol: str, args: list[str]) -> tuple[str, int, int]:
    """The file a launch names and where: (path, index of its first argument, how many arguments name
    it), or ("", 0, 0).

    Where the file is: for a FILE_LAST protocol the last argument(s), after whatever the registered
    command line carries (those stay arguments: `ACQUIRE` is a flag, not an MMOID), and only when they
    name no file the first ones (a command line typed with its flags after the file, `vdds FILE
    ACQUIRE`, whose file would otherwise never be answered); for the others the first argument(s), the
    file position of their file forms (`opp FILE`, `dexis @FILE`, `eaglesoft FILE`, `cliniview PATH`).
    A leading '@' marks an info file, as Dexis does.

    An argument starting with '-' is a flag, never the start of a file (`opp -p 4711 ...`,
    `cliniview -ID;FIRST;...`), and outside the file position nothing is a file: flag values and SET
    fields are data even when a file of that name happens to be in the working directory. A VDDS
    MMOVIEW id (the last argument alone, ASCII digits: `vdds 17`) is never a file either.

    PMSs start the command unquoted, so a path with spaces arrives as several arguments, joined again
    with single spaces: at the end, the longest run of trailing arguments is tried first (a PVS passes
    an absolute path, whose tail alone could name some other file relative to the working directory);
    at the start, the first one, two, three ... A regular file wins over anything else that exists: the
    first part of `C:\\Temp\\sp x\\MME1.tmp` may be a folder `C:\\Temp\\sp`. Only when no candidate is a
    regular file is the first that exists returned (a directory, a device), for `run` to refuse.
    """
    leading = [(0, count) for count in range(1, len(args) + 1)]
    if protocol in FILE_LAST:
        trailing = [(start, len(args) - start) for start in range(len(args))]
        spans = trailing + [span for span in leading if span not in trailing]
    else:
        spans = leading
    if protocol == "vdds" and args and args[-1].isascii() and args[-1].isdigit():
        spans.remove((len(args) - 1, 1))  # the MMOID of stage 3
    found: tuple[str, int, int] | None = None
    for start, count in spans:
        if args[start].startswith("-"):
            continue
        joined = " ".join(args[start : start + count])
        candidate = joined[1:] if joined.startswith("@") else joined
        if not candidate or not os.path.lexists(candidate):
            continue
        if os.path.isfile(candidate):
            return candidate, start, count
        found = found or (candidate, start, count)
    return found or ("", 0, 0)


def printable(text: str) -> str:
    """`text` as valid Unicode: the undecodable bytes of a POSIX argument or path escaped (`\\xe9`)."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no undecodable byte made
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_text(text: str) -> bool:
    """False for an argument that carries undecodable bytes (surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def say(line: str, stream: TextIO | None) -> None:
    """Write one line that cannot fail: what the stream's encoding cannot show is escaped (`\\u0141`).

    A PMS reading our redirected stdout in cp1252 must get the exit code of what the daemon did, not a
    UnicodeEncodeError after the patient was created. A missing or closed stream loses the line only.
    """
    if stream is None:  # pythonw, or a PMS starting us without standard handles
        return
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        line = printable(line).encode(encoding, "backslashreplace").decode(encoding, "replace")
    except LookupError:  # an encoding name Python does not know
        line = printable(line).encode("ascii", "backslashreplace").decode("ascii")
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError, UnicodeError):
        pass


def workstation() -> str:
    return os.environ.get("COMPUTERNAME") or _socket.gethostname()


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
_HEX = frozenset("0123456789abcdefABCDEF")


def quote(text: str, safe: str = "/") -> str:
    """Percent-encode UTF-8 as urllib.parse.quote does (that module costs more start-up than it saves)."""
    keep = _UNRESERVED | frozenset(safe.encode("ascii"))
    return "".join(chr(b) if b in keep else f"%{b:02X}" for b in text.encode("utf-8"))


def unquote(text: str) -> str:
    """Undo percent-encoding (UTF-8; a malformed escape stays as it is)."""
    if "%" not in text:
        return text
    first, *rest = text.split("%")
    out = bytearray(first.encode("utf-8"))
    for part in rest:
        if len(part) >= 2 and part[0] in _HEX and part[1] in _HEX:
            out.append(int(part[:2], 16))
            out += part[2:].encode("utf-8")
        else:
            out += b"%" + part.encode("utf-8")
    return out.decode("utf-8", errors="replace")


def connect(host: str, port: int, timeout: float) -> _socket.socket:
    """socket.create_connection with the C module only: each address of `host` in turn.

    An ASCII host name is passed as bytes so that resolving it does not load the IDNA codec.
    """
    name: str | bytes = host.encode("ascii") if host.isascii() else host
    error: OSError | None = None
    for family, kind, proto, _canonical, address in _socket.getaddrinfo(name, port, 0, _socket.SOCK_STREAM):
        sock = _socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error or OSError(f"{host} has no address")


def client_context(cafile: str) -> ssl.SSLContext:
    """How a client trusts the daemon's TLS listener: the certificate file from `api_endpoint` (the
    daemon's own, self-signed by `init`), else the system's CAs. Launches and `pms-bridge doctor` both
    connect with this, so doctor fails exactly when launches would.

    A certificate file that cannot be loaded is an OSError naming it and `[api] tls_cert`.
    """
    import ssl

    try:
        return ssl.create_default_context(cafile=cafile or None)
    except OSError as exc:  # ssl.SSLError is one too
        reason = exc.strerror or getattr(exc, "reason", None) or type(exc).__name__
        raise OSError(exc.errno, f"[api] tls_cert {cafile} cannot be loaded: {reason}") from None


def http_post(
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    body: bytes,
    *,
    tls: bool = False,
    cafile: str = "",
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 POST with `Connection: close`; returns (status, lower-cased headers, body)."""
    sock: _socket.socket = connect(host, port, TIMEOUT_SECONDS)
    try:
        if tls:  # only when the API listener is configured for TLS
            import socket

            sock = client_context(cafile).wrap_socket(
                socket.socket(fileno=sock.detach()), server_hostname=host
            )
        head = [
            f"POST {path} HTTP/1.1",
            f"Host: {host}:{port}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        head += [f"{name}: {value}" for name, value in headers.items()]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    finally:
        sock.close()
    raw = b"".join(chunks)
    header_blob, _, payload = raw.partition(b"\r\n\r\n")
    lines = header_blob.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    found: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    if found.get("transfer-encoding", "").lower() == "chunked":
        payload = _dechunk(payload)
    return status, found, payload


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


def _too_large(protocol: str, path: str, head: bytes, raw: RawConfig) -> int:
    """A message file over MAX_FILE_BYTES: the protocol's own answer goes into it (VDDS: into its request
    section, in its encoding and language, the rest of the file kept), then exit 2 and one line."""
    message = f"{printable(path)} is larger than {MAX_FILE_BYTES} bytes"
    target = TOO_LARGE_RENDERERS.get(protocol)
    if target:
        module, _, name = target.partition(":")
        import importlib  # only on this rare path

        try:
            renderer = getattr(importlib.import_module(module), name)
            settings = raw.get(protocol, {})
            rewrite_head(path, head, lambda size: renderer(head, size, MAX_FILE_BYTES, settings))
        except Exception as exc:  # the PMS must still get an exit code and a line
            message += f" (and the error answer could not be written: {exc})"
    say(f"pms-bridge {protocol}: {message}", sys.stderr)
    return ExitCode.INVALID


def _fail(
    protocol: str, path: str, content: bytes, message: str, code: int, raw: RawConfig | None = None
) -> int:
    """Answer without the daemon: the protocol's error answer into its file, one line on stderr."""
    target = UNREACHABLE_RENDERERS.get(protocol)
    if target and path:
        module, _, name = target.partition(":")
        import importlib  # only on this rare path

        message = printable(message)
        try:
            settings = (raw or {}).get(protocol, {})
            answer = getattr(importlib.import_module(module), name)(content, message, settings)
            if answer is not None:
                write_atomic(path, answer)
        except Exception as exc:  # the PMS must still get an exit code and a line
            message += f" (and the error answer could not be written: {exc})"
    say(f"pms-bridge {protocol}: {message}", sys.stderr)
    return code


def run(protocol: str, argv: list[str]) -> int:
    """Forward one PMS launch to the daemon and apply its answer; returns the process exit code."""
    config, args = split_config(argv)
    path, at, count = named_file(protocol, args)
    if count > 1:
        args = [*args[:at], " ".join(args[at : at + count]), *args[at + count :]]
    content = b""
    if path:  # opened by its real bytes (a str with surrogate escapes on POSIX); only its display is escaped
        shown = printable(path)
        if not os.path.isfile(path):
            what = "a directory" if os.path.isdir(path) else "not a regular file"
            return _fail(protocol, "", b"", f"cannot read {shown}: it is {what}", ExitCode.INVALID)
        try:
            with open(path, "rb") as fh:
                content = fh.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            return _fail(protocol, "", b"", f"cannot read {shown}: {reason}", ExitCode.INVALID)
    try:
        config_path = find_config_path(config)
        raw = read_raw(config_path)
        host, port, token, tls, cafile = api_endpoint(raw, config_home(config_path))
    except ConfigFileError as exc:
        return _fail(protocol, path, content[:MAX_FILE_BYTES], str(exc), ExitCode.UNREACHABLE)
    if len(content) > MAX_FILE_BYTES:
        return _too_large(protocol, path, content[:MAX_FILE_BYTES], raw)
    if path:  # the file's argument goes as it is shown: the daemon has its bytes already
        args = [*args[:at], printable(args[at]), *args[at + 1 :]]
    for arg in args:
        if not is_text(arg):
            return _fail(
                protocol,
                path,
                content,
                f"argument '{printable(arg)}' is not UTF-8 text: the PMS must pass its arguments in UTF-8",
                ExitCode.INVALID,
                raw,
            )
    query = "&".join("arg=" + quote(arg, safe="") for arg in args)
    headers = {
        "Authorization": f"Bearer {token}",
        "X-PMS-Filename": quote(printable(path)),
        "X-PMS-Workstation": quote(printable(workstation())),
        "Content-Type": "application/octet-stream",
    }
    try:
        status, reply_headers, body = http_post(
            host, port, f"{LAUNCH_PATH}{protocol}?{query}", headers, content, tls=tls, cafile=cafile
        )
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return _fail(
            protocol,
            path,
            content,
            f"the pms-bridge service is not reachable at {host}:{port} ({reason})",
            ExitCode.UNREACHABLE,
            raw,
        )
    if status != 200:
        import json  # only on the error path

        try:
            detail = json.loads(body).get("detail", "")
        except ValueError:
            detail = body[:200].decode("utf-8", "replace")
        return _fail(
            protocol,
            path,
            content,
            f"the pms-bridge service refused the request ({status}): {detail}",
            ExitCode.LAUNCH_REFUSED,
            raw,
        )
    if reply_headers.get("x-pms-write") == "1" and path:
        write_atomic(path, body)
    message = unquote(reply_headers.get("x-pms-message", ""))
    code = int(reply_headers.get("x-pms-exit", "1"))
    if message:
        say(message, sys.stderr if code else sys.stdout)
    return code
