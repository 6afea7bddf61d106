"""Durable storage of uploaded files: written and fsynced under settings.files_dir before the
job that names them is committed, so a 202 never points at a file a power cut could lose.

Each upload gets its own directory (`<files_dir>/<random>/<sanitised name>`), which belongs to
one job: the job's payload records the absolute path, which is all a handler needs to find
it, and pruning the job removes the directory (prune.py). So a rerun gets a copy of its
source's file in a directory of its own (JobQueue.rerun): two jobs naming one file lost it to
the first of them pruned.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import IO

from carwash_jobs.errors import PayloadTooLarge

_CHUNK = 1024 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(filename: str | None) -> str:
    """The client's file name reduced to a harmless last path segment (no separators, no
    leading dots), so it can never escape the upload's directory."""
    base = re.split(r"[\\/]", filename or "")[-1]
    cleaned = _UNSAFE.sub("_", base).lstrip(".")[:100]
    return cleaned or "upload"


async def store_upload(source: IO[bytes], filename: str | None, files_dir: str, max_bytes: int) -> Path:
    """Copy `source` into a new directory under `files_dir` and fsync it; returns the absolute
    path. Raises PayloadTooLarge (and leaves nothing behind) past `max_bytes`."""
    return await asyncio.to_thread(_store, source, safe_name(filename), Path(files_dir), max_bytes)


def is_upload(path: Path, files_dir: str | Path) -> bool:
    """Whether `path` lies in an upload's own directory under `files_dir`, as store_upload makes
    them: only such a directory is the engine's to copy or remove."""
    return path.resolve().parent.parent == Path(files_dir).resolve()


async def copy_upload(path: Path, files_dir: str) -> Path:
    """A durable copy of the upload at `path` in a new directory under `files_dir`, of the same
    name; returns its absolute path. FileNotFoundError when there is no such file."""
    def copy() -> Path:
        with path.open("rb") as source:
            return _store(source, path.name, Path(files_dir), None)

    return await asyncio.to_thread(copy)


def _store(source: IO[bytes], name: str, files_dir: Path, max_bytes: int | None) -> Path:
    root = files_dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    directory = root / secrets.token_hex(16)
    directory.mkdir()
    path = directory / name
    try:
        source.seek(0)
        written = 0
        with path.open("xb") as target:
            while chunk := source.read(_CHUNK):
                written += len(chunk)
                if max_bytes is not None and written > max_bytes:
                    raise PayloadTooLarge(f"the uploaded file is larger than {max_bytes} bytes")
                target.write(chunk)
            target.flush()
            os.fsync(target.fileno())
        _fsync_dir(directory)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return path


def _fsync_dir(directory: Path) -> None:
    """Make a new directory entry durable: fsyncing the file alone does not persist its name."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def remove_upload(path: Path) -> None:
    """Remove an upload that no job took (bad payload, an existing idempotency key, a rerun
    whose insert failed)."""
    await asyncio.to_thread(shutil.rmtree, path.parent, True)

