"""A local folder as run storage: atomic writes (rename), and the conditional operations
of leases through link(2) and flock."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from mace_ray.storage.base import StorageError, check_key


class LocalStorage:
    """A local folder. Atomic writes via a temporary sibling and ``os.replace``."""

    def __init__(self, root: str | Path, must_exist: bool = False) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
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

    def write_bytes(self, key: str, data: bytes) -> None:
        dest = self.path(key)
        tmp = self._staged(dest, data)
        try:
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.url}/{key} does not exist") from None

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def list(self, prefix: str) -> list[str]:
        """All file keys under ``prefix`` (recursive), sorted; temporaries excluded."""
        base = self.path(prefix)
        if not base.is_dir():
            return []
        keys = []
        for p in base.rglob("*"):
            rel = p.relative_to(self.root)
            # Dot-names are temporaries (atomic writes, put_dir staging): never listed.
            if p.is_file() and not any(part.startswith(".") for part in rel.parts):
                keys.append(rel.as_posix())
        return sorted(keys)

    def put_dir(self, local_dir: Path, key: str) -> None:
        """Copy a folder in under ``key``, replacing what was there, visible all at once."""
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
        shutil.copytree(local_dir, tmp)
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def get_dir(self, key: str, local_dir: Path) -> None:
        shutil.copytree(self.path(key), local_dir, dirs_exist_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        p = self.path(prefix)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    # --- conditional operations (leases) ----------------------------------------------
    # create_exclusive relies on link(2) failing when the name exists, so it needs no lock;
    # replace_if and delete_if compare then act while holding an flock on a sibling
    # ``.<name>.lock`` (hidden from list() like every dot-name). Nothing else removes or
    # replaces a lease, so between the comparison and the action the file cannot change
    # (an unconditional write_bytes to the same key would bypass this: leases use only these).
    # flock works between processes and threads on one machine; on NFS it depends on the
    # client (Linux emulates it with byte-range locks).

    def _staged(self, dest: Path, data: bytes) -> str:
        """A complete, synced temporary sibling of ``dest`` holding ``data``."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    @contextlib.contextmanager
    def _key_lock(self, dest: Path) -> Iterator[None]:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest.parent / f".{dest.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _version(self, dest: Path) -> tuple[bytes, str] | None:
        """Contents and version read from one open file (files are replaced, never edited
        in place, so both describe the same object). The version is inode, mtime and a
        content hash: a replace changes at least the hash unless the bytes are identical."""
        try:
            with open(dest, "rb") as f:
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
        tmp = self._staged(dest, data)
        try:
            os.link(tmp, dest)
            return True
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """``(data, version)`` of ``key``, or None if absent; the version is what
        replace_if/delete_if compare against."""
        return self._version(self.path(key))

    def replace_if(self, key: str, data: bytes, version: str) -> bool:
        """Atomically replace ``key`` only if its version is still ``version``."""
        dest = self.path(key)
        tmp = self._staged(dest, data)
        try:
            with self._key_lock(dest):
                current = self._version(dest)
                if current is None or current[1] != version:
                    return False
                os.replace(tmp, dest)
                return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    def delete_if(self, key: str, version: str) -> bool:
        """Delete ``key`` only if its version is still ``version``."""
        dest = self.path(key)
        if not dest.exists():
            return False
        with self._key_lock(dest):
            current = self._version(dest)
            if current is None or current[1] != version:
                return False
            dest.unlink()
            return True
