"""Drivers run an engine: a background thread for sync servers (:mod:`.thread`),
or an asyncio event loop with no thread at all (:mod:`.asyncio`).

A driver is the only code that steps an engine; it owns no connection.
"""

from .thread import INLINE_GRACE, ThreadDriver

__all__ = ["INLINE_GRACE", "ThreadDriver"]
