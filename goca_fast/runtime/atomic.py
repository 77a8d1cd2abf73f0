"""Atomic file writes: a file at its final name is always complete, never the half written by a killed process.

Every writer goes through a temp file beside the target (same filesystem, so the rename is atomic), named
`.tmp_<name>.<random><suffix>`, which no reader looks for; `os.replace` then puts it in place. A temp file left by a
hard crash is removed by `remove_stale_temps` on the next run. `file_stamp` tells whether a file was replaced since
a check (the journals of goca-flow, DALI's evaluation check cache).
"""
from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator, Optional

TEMP_PREFIX = ".tmp_"


@functools.lru_cache(maxsize=1)
def umask_mode() -> int:
    """0o666 minus the process umask: what a plain open() would give (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temp_beside(path: str | os.PathLike, suffix: str = "") -> str:
    """A new, empty temp file next to `path` (its folder created), with the mode a plain open() would give, or the
    mode of the file it will replace."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.path.basename(path)}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = umask_mode()
    try:
        os.chmod(tmp, mode)
    except OSError:  # filesystems without POSIX modes
        pass
    return tmp


def _fsync_dir(folder: str) -> None:
    """Make a rename itself durable (POSIX); skipped where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: str, path: str | os.PathLike, durable: bool = False) -> None:
    """Put the finished temp file `tmp` in place of `path` (fsyncing the folder too when `durable`)."""
    os.replace(tmp, path)
    if durable:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", durable: bool = False, suffix: str = "") -> Iterator[IO]:
    """`with atomic_open(p) as f: f.write(...)`: `p` becomes the new file only when the block ends without error;
    before that, and after any error, it is the old file (or absent). `durable` fsyncs the data and the rename
    (checkpoints: a power loss must not leave an empty file under the final name)."""
    tmp = temp_beside(path, suffix)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        commit(tmp, path, durable)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write text or bytes to `path` atomically."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def remove_stale_temps(root: str | os.PathLike, older_than: float = 120.0) -> list[Path]:
    """Delete the temp files a killed run left under `root` that were not modified for `older_than` s (a live
    writer keeps its own fresh; call with 0 only from the one process that writes there). Returns them."""
    removed, now = [], time.time()
    for d, _, files in os.walk(root):
        for f in files:
            if f.startswith(TEMP_PREFIX):
                p = Path(d) / f
                try:
                    if now - p.stat().st_mtime >= older_than:
                        p.unlink()
                        removed.append(p)
                except OSError:
                    pass
    return removed


def file_stamp(path: str | os.PathLike) -> Optional[str]:
    """"<size>:<mtime_ns>" of a file, None if it does not exist: a file replaced since (as every writer here
    replaces files whole) has another stamp, so a check cached under it need not be repeated."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"
