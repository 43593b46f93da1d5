"""Files that other processes and `kill -9` cannot break, on a shared machine or a cluster.

- `write_atomic`: a file is written under a temporary name unique to this process and
  renamed into place, so readers see the old or the new content, never a mix, and two
  writers never share a temporary file.
- `new_folder` / `open_new`: a folder or file that only this process gets (O_EXCL), never
  one that already existed.
- `FileLock`: an OS-level lock (flock on POSIX, msvcrt on Windows). The OS drops it when
  its process ends however it ends, so a killed process never leaves a stale lock.
- `RunLock`: the lock a trainer holds on its run folder; it names its holder (pid, host,
  start time, command) to anyone who is refused.

Leftovers of killed writes carry `TEMP_SUFFIX` (or are hidden `.step-*` folders, see
n2a_core.checkpoint), so the next holder of the run lock can remove them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from n2a_core import strict_json
from n2a_core.errors import N2AError, RunLockedError, SpecError

TEMP_SUFFIX = ".n2a-tmp"

log = logging.getLogger("n2a.files")


# -- unique names ------------------------------------------------------------------------
def temp_path(path: Path) -> Path:
    """A hidden sibling of `path` that no other process or call will use."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` in one rename; a crash leaves the old file (or none)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files killed writers left in `folder` (not recursive).

    Only for a folder nobody else writes to at the moment (its run lock is held)."""
    removed = []
    for path in folder.glob(f".*{TEMP_SUFFIX}") if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def new_folder(parent: Path, stem: str) -> Path:
    """Create and return `parent/stem`, or `stem-2`, `stem-3`, ... : the first name no one
    has taken. mkdir is atomic, so two processes never get the same folder."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1_000_000):
        path = parent / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise N2AError(f"{parent}: no free folder name for {stem}-N; clean up the folder")


def open_new(path: Path) -> BinaryIO:
    """Open `path` for writing only if it does not exist yet (FileExistsError otherwise)."""
    return open(path, "xb")


def write_first_free(folder: Path, stem: str, suffix: str, write: Callable[[BinaryIO], None]) -> Path:
    """Write STEM.SUFFIX, or STEM-2.SUFFIX, ... whichever is free first: never over an existing
    file, even with another process writing into the same folder. A failed write leaves nothing."""
    for n in range(1, 1_000_000):
        path = folder / (f"{stem}{suffix}" if n == 1 else f"{stem}-{n}{suffix}")
        try:
            fh = open_new(path)
        except FileExistsError:
            continue
        try:
            with fh:
                write(fh)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path
    raise FileExistsError(f"{folder}: no free {stem}-N{suffix} name; clean up the folder")


# -- OS-level locks ------------------------------------------------------------------------
if sys.platform == "win32":  # pragma: no cover - not tested on Windows
    import msvcrt

    # msvcrt locks byte ranges; lock one byte far past the holder's note so that others can
    # still read the note. Windows cannot delete an open file, so the lock file stays.
    _FAR = 1 << 30

    def _try_lock(fd: int, blocking: bool) -> bool:
        os.lseek(fd, _FAR, os.SEEK_SET)
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                if not blocking:
                    return False
                time.sleep(0.05)

    def _unlock(fd: int) -> None:
        os.lseek(fd, _FAR, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(fd: int, blocking: bool) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


class FileLock:
    """An exclusive OS-level lock on `path` (created if missing).

    flock works between processes on one machine and, on Linux, on NFS (as a POSIX lock);
    other network filesystems may not lock at all. Locks are per open file, so a second
    FileLock on the same path in the same process waits (or fails) like another process.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                locked = _try_lock(fd, blocking)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same or sys.platform == "win32":
                self.fd = fd
                return True
            os.close(fd)  # the holder removed the file as we waited: lock the current one

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            _unlock(fd)
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunLock:
    """The lock on a run folder, held for as long as a process trains in it.

    The lock file holds one line of JSON about its holder, for the error a second trainer
    gets. It is removed on a clean release; after `kill -9` it stays, unlocked, and the
    next trainer takes it over.
    """

    NAME = ".n2a-lock"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.lock = FileLock(self.root / self.NAME)
        self.created = False

    def acquire(self) -> None:
        """Take the lock or raise RunLockedError naming the holder; never waits."""
        self.created = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            got = self.lock.acquire(blocking=False)
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                log.warning("%s: this filesystem cannot lock files (%s); training unlocked: make sure "
                            "no other process trains in this folder", self.root, exc.strerror)
                return
            raise SpecError(f"{self.root}: cannot lock the run folder ({exc.strerror or exc}); "
                            "--out must be a folder you can write to") from None
        if not got:
            raise RunLockedError(f"{self.root}: {self.holder()} is training in this run folder; "
                                 "wait for it to finish (or stop it), or choose another --out")
        note = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"}
        os.ftruncate(self.lock.fd, 0)
        os.lseek(self.lock.fd, 0, os.SEEK_SET)
        os.write(self.lock.fd, (strict_json.dumps(note) + "\n").encode())

    def holder(self) -> str:
        """'process 123 on host h (since ...: n2a train ...)', as far as the lock file says."""
        try:
            note = json.loads((self.root / self.NAME).read_text().splitlines()[0])
            return (f"process {note['pid']} on {note['host']} (since {note['started']}: "
                    f"{note['command'][:200]})")
        except (OSError, ValueError, IndexError, KeyError, TypeError):
            return "another process"  # it has just taken the lock and not yet written its note

    def release(self) -> None:
        if self.lock.fd is None:
            return
        if sys.platform != "win32":
            with contextlib.suppress(OSError):
                (self.root / self.NAME).unlink()  # while still locked: see FileLock.acquire
        self.lock.release()
        if self.created:  # a run that failed before writing anything leaves no empty folder
            with contextlib.suppress(OSError):
                self.root.rmdir()

    @property
    def held(self) -> bool:
        return self.lock.fd is not None
