"""What a launch handler receives and answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bridge.model import Origin, Outcome, PatientRequest

if TYPE_CHECKING:
    from bridge.runtime import Runtime


@dataclass(frozen=True)
class Launch:
    """One PMS message as it arrived, before any parsing."""

    protocol: str
    args: tuple[str, ...] = ()  # command-line arguments after `pms-bridge <protocol>`
    filename: str = ""  # the file the PMS named (path as the PMS wrote it), "" if none
    content: bytes = b""  # that file's bytes
    workstation: str = ""
    transport: str = "cli"  # cli | folder | http
    request_id: str = ""
    # The charset an HTTP client declared for `content` (Content-Type); "" when none was declared, and
    # then the profile's encoding reads it, as it reads the files a PMS writes.
    charset: str = ""
    # Who sent it, for the audit log: the API token's actor name when the launch came over the API
    # ("token:<8 hex>"), "" for a watched folder (no token: the folder's share is the access control).
    actor: str = ""

    def origin(self) -> Origin:
        """The audit origin of everything this launch reads or changes: one place for every handler,
        so none of them can leave out the token that authorised the launch."""
        return Origin(
            protocol=self.protocol,
            transport=self.transport,
            workstation=self.workstation,
            actor=self.actor,
            request_id=self.request_id,
        )


@dataclass(frozen=True)
class LaunchReply:
    """What to answer: an exit code and one line for the PMS, and bytes to write back into its file.

    `content` None leaves the PMS's file alone (protocols without an answer file). `request` (the parsed
    request, when parsing got that far) and `phi` (other sensitive strings the message carried, such as an
    SSN or an address the request does not keep) tell record mode what to pseudonymise; `outcome` tells it
    which patient the message touched.
    """

    exit_code: int
    message: str
    content: bytes | None = None
    request: PatientRequest | None = None
    outcome: Outcome | None = None
    phi: tuple[str, ...] = ()


LaunchHandler = Callable[["Runtime", Launch], Awaitable[LaunchReply]]
