"""What storage does when things go wrong under it (issue 28 items 5 and 7): a full disk is one
line and leaves no staging behind, leftovers of a killed writer go with the next write of the
key, stored files are hashed as they stream (an S3 response cut off mid-way is resumed), and a
guarded storage refuses writes. Local folders, and the real S3 server (tests/s3server.py)
behind a proxy that cuts a response short (tests/s3proxy.py). No disk is really filled: the
write path is made to fail with ENOSPC/EDQUOT.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
from s3proxy import SlowProxy

import mace_ray.storage.local as local_mod
from mace_ray.storage.base import StorageError
from mace_ray.storage.local import LocalStorage

MB = 1024 * 1024


def dot_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def make_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_line_and_leaves_no_staging(tmp_path, monkeypatch, code):
    out = LocalStorage(tmp_path / "out")
    out.write_bytes("runs/r/manifest.json", b"{}")
    old = make_folder(tmp_path / "old", {"unet/w.bin": b"old"})
    out.put_dir(old, "runs/r/final/pipeline")
    new = make_folder(tmp_path / "new", {"model_index.json": b"{}", "unet/w.bin": os.urandom(3 * MB)})

    # put_dir: the first file is copied, the disk is full at the second.
    copy2 = shutil.copy2
    copied: list[Path] = []

    def fills_up(src, dst, **kw):
        if copied:
            raise OSError(code, os.strerror(code))
        copied.append(Path(dst))
        return copy2(src, dst, **kw)

    with monkeypatch.context() as m:
        m.setattr(local_mod.shutil, "copy2", fills_up)
        with pytest.raises(StorageError) as err:
            out.put_dir(new, "runs/r/final/pipeline")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"output {out.url}: ")
    assert {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded"}[
        code
    ] in msg
    assert "runs/r/final/pipeline (3.1 MB to write, " in msg and " free)" in msg
    assert copied and not copied[0].exists()  # the staging folder is gone, with what it held
    assert dot_entries(out.path("runs/r/final")) == []
    assert out.path("runs/r/final/pipeline/unet/w.bin").read_bytes() == b"old"  # the old copy stands

    # write_bytes: the disk fills while the data is synced.
    def full(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    with monkeypatch.context() as m:
        m.setattr(local_mod.os, "fsync", full)
        with pytest.raises(StorageError, match=r"writing runs/r/manifest.json \(2 B to write, .* free\)"):
            out.write_bytes("runs/r/manifest.json", b"[]")
    assert dot_entries(out.path("runs/r")) == []
    assert out.read_bytes("runs/r/manifest.json") == b"{}"


def test_leftovers_of_a_killed_writer_go_with_the_next_write_of_the_key(tmp_path):
    out = LocalStorage(tmp_path / "out")
    final = out.path("final")
    final.mkdir(parents=True)
    stale = [final / ".pipeline.a1b2c3d4.tmp", final / ".pipeline.0f0f0f0f.old"]
    for d in stale:  # folders a killed put_dir left, with what they held
        make_folder(d, {"unet/w.bin": b"x" * 1000})
    left_file = final / ".erasure.safetensors.k3j4h5g6.tmp"
    left_file.write_bytes(b"half")
    live = final / ".pipeline.livewrit.tmp"  # a writer still at work: it holds the lock
    live.mkdir()
    other_key = final / ".pipeline.v2.12345678.tmp"  # staging of another key
    other_key.mkdir()
    an_hour_ago = time.time() - 3600
    for p in [*stale, left_file, live, other_key]:
        os.utime(p, (an_hour_ago, an_hour_ago))
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        out.put_dir(make_folder(tmp_path / "new", {"model_index.json": b"{}"}), "final/pipeline")
        assert dot_entries(final) == sorted([live.name, left_file.name, other_key.name])
        out.write_bytes("final/erasure.safetensors", b"whole")
        assert dot_entries(final) == sorted([live.name, other_key.name])
    finally:
        os.close(fd)
    assert out.read_bytes("final/erasure.safetensors") == b"whole"
    assert out.list("final") == ["final/erasure.safetensors", "final/pipeline/model_index.json"]


def test_digests_stream_and_a_guard_refuses_writes(tmp_path):
    out = LocalStorage(tmp_path / "out")
    data = os.urandom(5 * MB + 7)
    out.write_bytes("a/big.bin", data)
    assert out.digest("a/big.bin") == hashlib.sha256(data).hexdigest()
    with pytest.raises(StorageError, match="does not exist"):
        out.digest("a/none.bin")

    class Refused(Exception):
        pass

    def refuse() -> None:
        raise Refused("lease lost")

    guarded = out.guarded(refuse)
    for write in (
        lambda: guarded.write_bytes("a/new.bin", b"x"),
        lambda: guarded.put_dir(make_folder(tmp_path / "f", {"x": b"x"}), "a/folder"),
        lambda: guarded.delete_prefix("a"),
    ):
        with pytest.raises(Refused):
            write()
    assert out.list("a") == ["a/big.bin"] and dot_entries(out.path("a")) == []
    assert guarded.read_bytes("a/big.bin") == data  # reads are not checked


def test_s3_digest_streams_and_resumes_a_response_cut_off(s3_server, aws_env, bucket, caplog):
    from mace_ray.storage.s3 import S3Storage

    proxy = SlowProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    try:
        s = S3Storage(f"s3://{bucket}/x", proxy.endpoint, retry_seconds=10)
        data = os.urandom(3 * MB + 11)
        s.write_bytes("big.bin", data)
        assert s.digest("big.bin") == hashlib.sha256(data).hexdigest()
        proxy.cut_after = MB  # the next response ends a third of the way in
        with caplog.at_level(logging.WARNING, logger="mace_ray.s3"):
            assert s.digest("big.bin") == hashlib.sha256(data).hexdigest()
        assert any("cut off at byte" in r.getMessage() for r in caplog.records)
        proxy.cut_after = 2 * MB
        assert s.read_bytes("big.bin") == data
        with pytest.raises(StorageError, match="does not exist"):
            s.digest("none.bin")
    finally:
        proxy.close()
