"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename into place.

A run left for days gets killed at some point (a node reboot, SIGKILL, a full disk). Every file
difflm writes goes through one of these helpers, so a reader sees either the old content or the
new content, never half a file. ``os.replace`` is atomic on one POSIX filesystem (and replaces an
existing target); the temporary file lives beside the target so the rename never crosses devices.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["atomic_path", "atomic_save", "atomic_write_bytes", "atomic_write_text", "atomic_symlink"]


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (the directory entry); best effort where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_temp(target: Path) -> Path:
    """An empty file beside ``target`` with a fresh name; mode 0o666 minus the umask, like open() gives
    (mkstemp's 0o600 would leave spec.yaml and summary.json unreadable to anyone else)."""
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{os.getpid()}.{next(tempfile._get_candidate_names())}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {target}")  # pragma: no cover


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it onto ``target``.

    For writers that need a path rather than bytes (``safetensors.save_file``, ``torch.save``).
    On an exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(target)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_save(target: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """``write(tmp_path)`` then rename onto ``target`` (see :func:`atomic_path`)."""
    with atomic_path(target) as tmp:
        write(tmp)


def atomic_symlink(target: str | os.PathLike[str], link: str | os.PathLike[str]) -> None:
    """Point ``link`` at ``target`` (stored relative to the link's folder), replacing any old link atomically.

    A new symlink is made under a temporary name and renamed over the old one, so ``link`` never
    goes missing in between (``unlink`` + ``symlink`` would leave a moment with no link at all).
    """
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(Path(target), link.parent)
    for attempt in range(100):
        tmp = link.parent / f".{link.name}.{os.getpid()}.{attempt}.tmp"
        try:
            os.symlink(rel, tmp, target_is_directory=Path(target).is_dir())
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - a hundred stale temporaries
        raise FileExistsError(f"cannot create a temporary link beside {link}")
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(link.parent)
