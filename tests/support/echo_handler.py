"""A launch handler used only by tests of the launch transport: it echoes what arrived."""

from __future__ import annotations

import json

from bridge.handlers.base import Launch, LaunchReply
from bridge.runtime import Runtime


async def handle(rt: Runtime, launch: Launch) -> LaunchReply:
    """Answer with a JSON description of the launch; exit code 5 when asked to fail."""
    description = {
        "protocol": launch.protocol,
        "args": list(launch.args),
        "filename": launch.filename,
        "content": launch.content.decode("latin-1"),
        "workstation": launch.workstation,
    }
    failing = "fail" in launch.args
    return LaunchReply(
        5 if failing else 0, "Grüße: done" if not failing else "refused", json.dumps(description).encode()
    )
