"""pms-bridge: connects dental practice management systems to an imaging store.

This package must stay cheap to import: the launch commands a PMS waits on (`pms-bridge vdds FILE` ...)
import it, so nothing heavy may be imported at package level.
"""

__version__ = "0.1.0"
