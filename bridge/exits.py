"""The exit codes of the launch commands (`pms-bridge vdds|opp|dexis|dentrix|eaglesoft|cliniview ...`).

One table for the launch client (`bridge.launch`) and the daemon's launch handlers, because the process a
PMS waits on exits with whichever of them answered, and each protocol's guide lists these numbers for
PMS vendors and admins (docs/vdds.md, docs/opp.md, docs/us-pms.md): they must never drift apart. Not
every protocol uses every code: VDDS exits with its ERRORLEVEL (0 or 1), and OPP's documented table folds
every refusal into 1 (`bridge.handlers.opp.EXIT_CODES`); the US profiles tell 5 to 7 apart
(`bridge.handlers.profile.EXIT_CODES`). Those mappings live with their handlers because their keys,
`bridge.model.Status`, are too heavy for the launch client.

Only `enum` is imported: the launch client loads it anyway (configparser imports re, which imports enum).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What a launch command's exit code means; the values are documented and must not change."""

    OK = 0
    # The request failed. US profiles: an internal error (the daemon log has it under the request id);
    # VDDS: answered with ERRORLEVEL=1; OPP: any refusal by the store (unknown patient, conflict, forbidden).
    ERROR = 1
    # The message cannot be read (truncated, bad date, no patient id ...), or, from the launch client, its
    # file cannot be read or is too large, or an argument is not UTF-8 text.
    INVALID = 2
    UNREACHABLE = 3  # launch client: the daemon is not reachable, or the config file cannot be read
    LAUNCH_REFUSED = 4  # launch client: the daemon refused the launch request itself (a wrong token ...)
    NOT_FOUND = 5  # US profiles: no such patient
    CONFLICT = 6  # US profiles: an identity conflict, recorded and listed in GET /api/v1/conflicts
    FORBIDDEN = 7  # US profiles: the PMS settings forbid it (patient creation disabled ...)
