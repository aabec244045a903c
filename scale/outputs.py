"""Outputs are never clobbered: a command that writes a folder (`export`, `demo-data`) refuses a
non-empty one unless told `--overwrite`, and writes into a temporary sibling that is renamed into
place only once everything is written; one that writes a file (`evaluate --out`) refuses an existing
one the same way and renames a complete temporary file into place. A failure (a bad input, a full disk, a kill)
leaves the old output or none, never half of each.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def refuse_non_empty(out: Path, overwrite: bool, option: str) -> None:
    """ValueError naming `out` when it is a non-empty folder (or not a folder) and not `overwrite`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out}: exists and is not a folder; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{option} {out}: the folder is not empty; give an empty or new folder, "
                         "or --overwrite to replace it (everything in it)")  # fmt: skip


@contextmanager
def output_folder(out: str | Path, overwrite: bool = False, option: str = "--out") -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out`; on success it replaces `out` (module doc)."""
    out = Path(out)
    refuse_non_empty(out, overwrite, option)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out.exists():  # swap: the old output stays whole until the new one is in place
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, out)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and error.filename and str(error.filename).startswith(str(staging)):
            error.filename = str(out) + str(error.filename)[len(str(staging)) :]  # name what the user asked for
        raise


def refuse_existing_file(path: str | Path, overwrite: bool, option: str) -> Path:
    """ValueError naming `path` when it is a folder, or an existing file and not `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder; give a file path")
    if path.exists() and not overwrite:
        raise ValueError(f"{option} {path}: the file exists; give a new path, or --overwrite to replace it")
    return path


def write_file(path: str | Path, data: bytes, overwrite: bool = False, option: str = "--out") -> Path:
    """Write a one-file output whole or not at all (a temporary sibling renamed into place); an
    existing file is refused unless `overwrite`."""
    path = refuse_existing_file(path, overwrite, option)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        staging.write_bytes(data)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return path


def disk_error(error: OSError, what: str) -> str | None:
    """A one-line message for an OSError a user can act on (a full disk, no permission), else None."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what}: no space left on the device ({error.filename or 'while writing'}); free some and run it again"
    if error.errno == errno.EFBIG:
        return (f"{what}: {error.filename or 'a file'} is too large for the file system or the file-size limit "
                "(ulimit -f); write elsewhere or raise the limit")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}: cannot write {error.filename or ''} ({error.strerror}); choose a folder you can write"
    return None
