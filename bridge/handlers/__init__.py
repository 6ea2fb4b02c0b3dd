"""Per-protocol glue between a transport and the service: parse, handle, write files, render.

A launch is one PMS message as it arrived: the command-line arguments a PMS started `pms-bridge <protocol>`
with, the bytes of the file it named, or a file dropped in a watched folder. Each protocol has one
handler `async def handle(rt, launch) -> LaunchReply`, registered in HANDLERS by dotted path and imported
on first use, so the daemon loads only the protocols it serves.

Wire formats stay in `protocols/`; identity decisions stay in `bridge.service`.
"""

from __future__ import annotations

# typing.TYPE_CHECKING without importing typing, whose start-up cost a PMS waiting on a launch would pay;
# mypy treats this name as True.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from bridge.handlers.base import LaunchHandler

# protocol name -> "module:function". Protocols add themselves here. Kept free of heavy imports: the
# command line reads it to know which commands are launches.
HANDLERS: dict[str, str] = {
    "dexis": "bridge.handlers.dexis:handle_dexis",
    "dentrix": "bridge.handlers.dexis:handle_dentrix",
    "eaglesoft": "bridge.handlers.eaglesoft:handle",
    "cliniview": "bridge.handlers.cliniview:handle",
    "vdds": "bridge.handlers.vdds:handle",
    "opp": "bridge.handlers.opp:handle",
}


class UnknownProtocol(LookupError):
    pass


def get_handler(protocol: str) -> LaunchHandler:
    """The handler of `protocol`, imported on first use."""
    target = HANDLERS.get(protocol)
    if target is None:
        raise UnknownProtocol(
            f"unknown protocol {protocol!r} (known: {', '.join(sorted(HANDLERS)) or 'none'})"
        )
    module, _, name = target.partition(":")
    import importlib  # here, not at the top: the launch commands import this package

    handler: LaunchHandler = getattr(importlib.import_module(module), name)
    return handler
