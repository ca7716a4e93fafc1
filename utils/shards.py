"""Shards of a prediction run without torchrun: which share of the slides this process predicts.

A cluster array job (SLURM ``--array``, a Kubernetes indexed Job) starts one process per task;
each predicts one share (shard) of the slides and saves their records, and one final run with
``TEST.MERGE True`` assembles the outputs. The split depends only on the slides' ids and sizes on
disk, so every task computes the same one without talking to the others.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["ShardError", "resolve_shard", "split_balanced", "path_bytes", "shard_ids"]


class ShardError(ValueError):
    """Shard settings that cannot be used; the message names the key or variable."""


def _env_int(environ: Mapping[str, str], name: str) -> Optional[int]:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ShardError(f"{name}={value!r} is not an integer") from None


def resolve_shard(shards: int, index: int, environ: Optional[Mapping[str, str]] = None) -> Tuple[int, int]:
    """``(index, count)`` of this process's shard. ``shards`` (TEST.SHARDS, 0: unset) and ``index``
    (TEST.SHARD_INDEX, -1: unset) win over the environment: SLURM_ARRAY_TASK_COUNT and
    SLURM_ARRAY_TASK_ID (counted from SLURM_ARRAY_TASK_MIN in steps of SLURM_ARRAY_TASK_STEP), or
    JOB_COMPLETION_INDEX (whose count TEST.SHARDS gives). ``(0, 1)``: not sharded."""
    env = os.environ if environ is None else environ
    slurm_id, slurm_count = _env_int(env, "SLURM_ARRAY_TASK_ID"), _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    k8s_index = _env_int(env, "JOB_COMPLETION_INDEX")
    count, count_from = shards, "TEST.SHARDS"
    if count <= 0:
        count, count_from = (slurm_count, "SLURM_ARRAY_TASK_COUNT") if slurm_count else (1, "default")
    if index < 0:
        if slurm_id is not None:
            start, step = _env_int(env, "SLURM_ARRAY_TASK_MIN") or 0, _env_int(env, "SLURM_ARRAY_TASK_STEP") or 1
            index, index_from = (slurm_id - start) // max(1, step), "SLURM_ARRAY_TASK_ID"
        elif k8s_index is not None:
            index, index_from = k8s_index, "JOB_COMPLETION_INDEX"
            if count_from == "default":
                raise ShardError("JOB_COMPLETION_INDEX is set but not the number of shards: set TEST.SHARDS "
                                 "(the Job's completions)")
        else:
            index, index_from = 0, "default"
            if count > 1:
                raise ShardError(f"{count_from} gives {count} shards but not which one this is: set "
                                 "TEST.SHARD_INDEX (or run as a SLURM array task)")
    else:
        index_from = "TEST.SHARD_INDEX"
    if not 0 <= index < count:
        raise ShardError(f"shard index {index} ({index_from}) must be >= 0 and < the {count} shard(s) of "
                         f"{count_from} (shards are numbered from 0)")
    return index, count


def path_bytes(path: str) -> int:
    """Bytes on disk of a slide: its file, or every file of a DICOM folder."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
    return os.path.getsize(path)


def split_balanced(sizes: Dict[str, int], count: int) -> List[List[str]]:
    """``count`` shares of the ids of ``sizes`` (id -> size), balanced by size: the largest first,
    each to the share with the least so far (lowest index on ties); each share sorted by id. The
    result depends only on ``sizes`` and ``count``: every task computes the same split."""
    loads = [0] * count
    shares: List[List[str]] = [[] for _ in range(count)]
    for item_id, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        k = min(range(count), key=lambda j: (loads[j], j))
        shares[k].append(item_id)
        loads[k] += size
    return [sorted(share) for share in shares]


def shard_ids(items: Sequence[Tuple[str, str]], index: int, count: int) -> List[str]:
    """The ids of shard ``index`` of ``count`` among ``(id, path)`` items."""
    if count == 1:
        return [item_id for item_id, _ in items]
    return split_balanced({item_id: path_bytes(path) for item_id, path in items}, count)[index]
