"""Small file helpers: atomic writes, so an interrupted run never leaves a torn file; files known
by their content or stamp, so a rerun never reuses work done on another file of the same name."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from typing import Any, Iterable, List, Sequence

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "read_json", "csv_text", "atomic_write_csv",
           "file_sha256", "file_stamp"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str) -> Any:
    with open(path, "r", encoding="utf-8") as fh:
        return json.load(fh)


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A CSV document (``csv`` module quoting: ids with commas, quotes or newlines survive)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def atomic_write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    atomic_write_text(path, csv_text(header, rows))


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, read in 1 MB blocks: a model file known by its content."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_stamp(path: str) -> List[int]:
    """``[size, mtime_ns]`` of a file (or of a folder's files, summed and latest, for a DICOM
    slide's folder): a slide replaced under the same name gets another stamp, without reading its
    gigabytes."""
    if os.path.isdir(path):
        stats = [os.stat(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names]
        return [sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
    stat = os.stat(path)
    return [int(stat.st_size), int(stat.st_mtime_ns)]
