"""Crash-safe file writes: write a temporary file in the same folder, fsync, then rename over the target.

Files get the mode an ordinary `open()` would give them (0666 less the umask): `mkstemp` alone makes them 0600,
which hides a shared results folder from the group that reads it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), else set-and-restore under a lock."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a newly created file: 0666 less the umask."""
    return 0o666 & ~current_umask()


class FolderError(ValueError):
    """A folder that cannot take new files (missing and not creatable, not a folder, not writable)."""


def check_writable_folder(root: Path, what: str) -> None:
    """Raise FolderError, calling `root` `what` ("results folder"), unless files can be written there; creates
    nothing (a missing folder is fine where its first existing ancestor is writable)."""
    try:
        if root.exists() and not root.is_dir():
            raise FolderError(f"{what} {root} is not a directory")
        probe = root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
    except OSError as err:
        raise FolderError(f"{what} {root} cannot be read ({err.strerror or err})") from None
    if not probe.is_dir():
        raise FolderError(f"{what} {root} cannot be created: {probe} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".petlbench-write-test.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        reason = err.strerror or str(err)
        if probe == root:
            raise FolderError(f"{what} {root} is not writable ({reason})") from None
        raise FolderError(f"{what} {root} cannot be created in {probe} ({reason})") from None


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see either the old or the new file, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), file_mode())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Atomic text write (UTF-8)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def json_text(obj: Any) -> str:
    """The JSON text the atomic writer stores (indented, NaN written as null)."""
    return json.dumps(_finite(obj), indent=2, sort_keys=False, default=str) + "\n"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Atomic JSON write (indented, NaN written as null)."""
    write_text_atomic(path, json_text(obj))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on `path`, for read-modify-write of shared files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
