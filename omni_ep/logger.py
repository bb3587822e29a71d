"""The package's one logger hierarchy, ``omni_ep.*``, and its console set-up for scripts.

Library modules log through ``logging.getLogger(__name__)`` and never print; they add no handler. A script calls
``configure_logging(verbosity)`` once, before anything else logs:

    verbosity  -1 (-q): warnings and errors   0: + progress lines (INFO)   1 (-v): + details (DEBUG)

Under several ranks every line starts with ``[rank r/W]``, and ranks other than 0 show only warnings and errors
unless -v (so a progress line is printed once, an error by every rank that hits it). Lines go to stderr.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT_LOGGER = "omni_ep"


class _RankFilter(logging.Filter):
    """Drops records below ``min_level`` (ranks other than 0 without -v)."""

    def __init__(self, min_level: int):
        super().__init__()
        self.min_level = min_level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.min_level


def configure_logging(verbosity: int = 0, rank: int | None = None, world_size: int | None = None) -> logging.Logger:
    """Give the ``omni_ep`` logger one stderr handler at the level ``verbosity`` picks; returns that logger.

    rank / world_size default to torchrun's RANK / WORLD_SIZE (read now, not at import), so lines printed before
    the process group exists carry their rank too. Calling it again replaces the handler.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}%(levelname)s %(message)s"))
    if rank != 0 and verbosity <= 0:
        handler.addFilter(_RankFilter(logging.WARNING))
    logger = logging.getLogger(ROOT_LOGGER)
    for old in [h for h in logger.handlers if getattr(h, "_omni_ep", False)]:
        logger.removeHandler(old)
    handler._omni_ep = True
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger
