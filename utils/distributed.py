"""The process's place under ``torchrun``: one helper for rank, world size and local rank."""
from __future__ import annotations

import os

__all__ = ["rank", "world_size", "local_rank", "is_main"]


def rank() -> int:
    """This process's global rank (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes of the run (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's rank on its node (its GPU index under torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True for the process that writes the outputs (rank 0)."""
    return rank() == 0
