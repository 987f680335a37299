"""A local folder as run storage: atomic writes (rename), and the conditional operations
of leases through link(2) and flock.

Staging. A write goes to a dot-named sibling (``.<name>.<8 chars>.tmp``, a file or, for
``put_dir``, a folder) that is renamed into place once complete. Its writer holds an flock on
it until then, so the staging of a live writer is never mistaken for a leftover; on any failure
the writer removes it, and after a successful write of a key any unlocked staging left of that
key (by a killed writer) is removed. A full disk (ENOSPC) or quota (EDQUOT) is one
StorageError naming the output folder, what the write needed and what is free.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from mace_ray.storage.base import StorageError, check_key

# Staging younger than this is left alone even when unlocked: its writer may be between
# creating it and locking it.
STALE_AFTER_S = 2.0
FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded"}


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _remove_if_unlocked(path: Path) -> None:
    """Remove a staging file or folder unless its writer still holds its lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # gone meanwhile
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live writer's
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


class LocalStorage:
    """A local folder. Atomic writes via a temporary sibling and ``os.replace``."""

    def __init__(self, root: str | Path, must_exist: bool = False) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
        self.guard: Callable[[], None] | None = None
        # Nothing is created here: the folder appears with the first write, so a command
        # that fails on its inputs (or only reads, as `status`) leaves no empty folder.
        if self.root.exists():
            if not self.root.is_dir():
                raise StorageError(f"output {str(root)!r} is a file, not a folder")
            if not os.access(self.root, os.W_OK | os.X_OK) and not must_exist:
                raise StorageError(f"output {str(root)!r} is not writable")
            return
        if must_exist:
            raise StorageError(f"output {str(root)!r} does not exist")
        parent = next(p for p in self.root.parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise StorageError(
                f"output {str(root)!r} cannot be created: {str(parent)!r} is not a writable folder"
            )

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def bounded(self, budget_s: float) -> LocalStorage:
        """Local requests need no budget: the same storage."""
        return self

    def guarded(self, check: Callable[[], None]) -> LocalStorage:
        """The same folder; write_bytes, put_dir and delete_prefix first call ``check()``
        (which raises to refuse), and put_dir again right before its result appears."""
        other = copy.copy(self)
        other.guard = check
        return other

    def _check(self) -> None:
        if self.guard is not None:
            self.guard()

    def write_bytes(self, key: str, data: bytes) -> None:
        self._check()
        dest = self.path(key)
        with self._space(key, len(data)), self._staged(dest, data) as tmp:
            os.replace(tmp, dest)
        self._drop_leftovers(dest)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.url}/{key} does not exist") from None
        except IsADirectoryError:
            # A folder where a run's file belongs (a hand-edited run): its input, not a bug.
            raise StorageError(f"{self.url}/{key} is a folder, not a file") from None

    def digest(self, key: str) -> str:
        """SHA-256 of a stored file, read in chunks."""
        try:
            with open(self.path(key), "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        except FileNotFoundError:
            raise StorageError(f"{self.url}/{key} does not exist") from None
        except IsADirectoryError:
            raise StorageError(f"{self.url}/{key} is a folder, not a file") from None

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def list(self, prefix: str) -> list[str]:
        """All file keys under ``prefix`` (recursive), sorted; temporaries excluded."""
        base = self.path(prefix)
        if not base.is_dir():
            return []
        rels = (p.relative_to(self.root) for p in base.rglob("*") if p.is_file())
        # Dot-names are temporaries (atomic writes, put_dir staging): never listed.
        return sorted(r.as_posix() for r in rels if not any(part.startswith(".") for part in r.parts))

    def put_dir(self, local_dir: Path, key: str) -> None:
        """Copy a folder in under ``key``, replacing what was there, visible all at once."""
        self._check()
        dest = self.path(key)
        entries = sorted(Path(local_dir).rglob("*"))
        needed = sum(p.stat().st_size for p in entries if p.is_file())
        with self._space(key, needed):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
            fd = None
            try:
                tmp.mkdir()
                fd = os.open(tmp, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)
                # File by file rather than copytree, which folds a full disk into shutil.Error.
                for src in entries:
                    target = tmp / src.relative_to(local_dir)
                    (target if src.is_dir() else target.parent).mkdir(parents=True, exist_ok=True)
                    if not src.is_dir():
                        shutil.copy2(src, target)
                self._check()  # the folder appears only while the writer may still write
                old = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.old"
                if dest.exists():
                    os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            finally:
                if fd is not None:
                    os.close(fd)
                shutil.rmtree(tmp, ignore_errors=True)  # only if it was not moved into place
        self._drop_leftovers(dest)

    def get_dir(self, key: str, local_dir: Path) -> None:
        shutil.copytree(self.path(key), local_dir, dirs_exist_ok=True)

    def get_files(self, files: Mapping[str, Path]) -> None:
        """Copy stored files (``{key: local path}``) out."""
        for key, dest in files.items():
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(self.path(key), dest)
            except FileNotFoundError:
                raise StorageError(f"{self.url}/{key} does not exist") from None

    def delete_prefix(self, prefix: str) -> None:
        self._check()
        p = self.path(prefix)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    @contextlib.contextmanager
    def _staged(self, dest: Path, data: bytes) -> Iterator[str]:
        """A complete, synced temporary sibling of ``dest`` holding ``data``, locked while the
        block runs (so no cleanup takes it for a leftover) and removed after it unless the
        block moved it into place."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(os.dup(fd), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            yield tmp
        finally:
            os.close(fd)
            Path(tmp).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _space(self, key: str, needed: int) -> Iterator[None]:
        """A full disk or quota as one StorageError line (after the staging is removed)."""
        try:
            yield
        except OSError as e:
            if e.errno not in FULL:
                raise
            where = next(p for p in (self.root, *self.root.parents) if p.exists())
            free = shutil.disk_usage(where).free
            raise StorageError(
                f"output {self.url}: {FULL[e.errno]} writing {key} ({_size(needed)} to write, "
                f"{_size(free)} free); make room or choose another output, then rerun to resume"
            ) from None

    def _drop_leftovers(self, dest: Path) -> None:
        """Remove staging of ``dest`` left by writers that died (unlocked, not brand new)."""
        pattern = re.compile(rf"\.{re.escape(dest.name)}\.[A-Za-z0-9_]{{8}}\.(tmp|old)")
        try:
            entries = [e for e in os.scandir(dest.parent) if pattern.fullmatch(e.name)]
        except OSError:
            return
        for e in entries:
            try:
                if time.time() - e.stat(follow_symlinks=False).st_mtime < STALE_AFTER_S:
                    continue
            except OSError:
                continue
            _remove_if_unlocked(Path(e.path))

    # --- conditional operations (leases) ----------------------------------------------
    # create_exclusive relies on link(2) failing when the name exists, so it needs no lock;
    # replace_if and delete_if compare then act holding an flock on a sibling ``.<name>.lock``
    # (hidden like every dot-name). Nothing else removes or replaces a lease (leases use only
    # these), so between the comparison and the action the file cannot change. flock works
    # between processes and threads on one machine; on NFS it depends on the client.

    @contextlib.contextmanager
    def _key_lock(self, dest: Path) -> Iterator[None]:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest.parent / f".{dest.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """``(data, version)`` of ``key``, or None if absent; the version is what replace_if and
        delete_if compare. Both come from one open file (files are replaced, never edited in
        place); the version is inode, mtime and a content hash: a replace changes at least the
        hash unless the bytes are identical."""
        try:
            with open(self.path(key), "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        digest = hashlib.sha256(data).hexdigest()[:32]
        return data, f"{st.st_ino}-{st.st_mtime_ns}-{digest}"

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist; False if it does. Readers never see a
        partial file: the data is written to a temporary first, then hard-linked into place
        (link fails atomically when the name is taken)."""
        dest = self.path(key)
        with self._staged(dest, data) as tmp:
            try:
                os.link(tmp, dest)
                return True
            except FileExistsError:
                return False

    def replace_if(self, key: str, data: bytes, version: str) -> bool:
        """Atomically replace ``key`` only if its version is still ``version``."""
        dest = self.path(key)
        with self._staged(dest, data) as tmp, self._key_lock(dest):
            current = self.read_versioned(key)
            if current is None or current[1] != version:
                return False
            os.replace(tmp, dest)
            return True

    def delete_if(self, key: str, version: str) -> bool:
        """Delete ``key`` only if its version is still ``version``."""
        dest = self.path(key)
        if not dest.exists():
            return False
        with self._key_lock(dest):
            current = self.read_versioned(key)
            if current is None or current[1] != version:
                return False
            dest.unlink()
            return True
