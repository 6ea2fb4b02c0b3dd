"""A launch handler used only by tests of the launch transport: it echoes what arrived."""

from __future__ import annotations

import json

from bridge.exits import ExitCode
from bridge.handlers.base import Launch, LaunchReply
from bridge.runtime import Runtime


async def handle(rt: Runtime, launch: Launch) -> LaunchReply:
    """Answer with a JSON description of the launch; exit code NOT_FOUND when asked to fail."""
    description = {
        "protocol": launch.protocol,
        "args": list(launch.args),
        "filename": launch.filename,
        "content": launch.content.decode("latin-1"),
        "workstation": launch.workstation,
    }
    failing = "fail" in launch.args
    return LaunchReply(
        ExitCode.NOT_FOUND if failing else ExitCode.OK,
        "Grüße: done" if not failing else "refused",
        json.dumps(description).encode(),
    )
