"""tokenizer/storage.py: the one atomic publish (temp file, fsync, rename, directory fsync)."""
import os
import pathlib
import signal
import stat
import subprocess
import sys
import textwrap

import fsspec
import pytest

from tokenizer import storage
from tokenizer.storage import AtomicFile, write_bytes_atomic

ROOT = pathlib.Path(__file__).parents[2]


def test_write_bytes_atomic_writes_replaces_and_leaves_no_temp(tmp_path):
    url = str(tmp_path / "a" / "b" / "x.bin")          # parents are created
    write_bytes_atomic(url, b"first")
    write_bytes_atomic(url, b"second")
    assert open(url, "rb").read() == b"second"
    assert os.listdir(tmp_path / "a" / "b") == ["x.bin"]


def test_published_file_has_the_umask_mode_not_a_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        write_bytes_atomic(str(tmp_path / "x"), b"1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "x").st_mode) == 0o644


def test_fsync_of_the_file_before_the_rename_then_of_the_directory(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "replace", replace)
    write_bytes_atomic(str(tmp_path / "x.json"), b"{}")
    assert events == [("fsync", "file"), ("replace", "x.json"), ("fsync", "dir")]


def test_a_writer_failing_midway_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old complete contents")
    with pytest.raises(RuntimeError):
        with AtomicFile(str(target)) as f:
            f.write(b"half of the new")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"old complete contents"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_a_failed_rename_publishes_nothing(tmp_path, monkeypatch):
    def replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(storage.os, "replace", replace)
    with pytest.raises(OSError):
        write_bytes_atomic(str(tmp_path / "x.bin"), b"data")
    assert os.listdir(tmp_path) == []


def test_a_killed_writer_never_leaves_a_partial_file_under_the_name(tmp_path):
    """SIGKILL in the middle of writing: the name does not exist, only a hidden temp file."""
    target = tmp_path / "big.bin"
    code = textwrap.dedent(f"""
        import sys, time
        from tokenizer.storage import AtomicFile
        with AtomicFile({str(target)!r}) as f:
            f.write(b"x" * (1 << 20))
            f.flush()
            print("half", flush=True)
            time.sleep(60)
            f.write(b"y" * (1 << 20))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline() == b"half\n"
        temps = os.listdir(tmp_path)
        assert len(temps) == 1 and temps[0].startswith(".big.bin.tmp-")
        assert storage.temporary_target(temps[0]) == "big.bin"      # a later run can find it
        assert storage.temporary_target("big.bin") is None
        assert storage.temporary_target(".hidden") is None
        assert os.path.getsize(tmp_path / temps[0]) == 1 << 20
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not target.exists()


def test_tmp_dir_holds_the_temp_file(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(storage.os, "replace", lambda s, d: (seen.append(s), real_replace(s, d)))
    write_bytes_atomic(str(tmp_path / "out" / "x"), b"1", tmp_dir=str(tmp_path / "out" / "_tmp"))
    assert os.path.dirname(seen[0]) == str(tmp_path / "out" / "_tmp")
    assert os.listdir(tmp_path / "out" / "_tmp") == []


def test_long_names_keep_the_temp_name_within_255_bytes(tmp_path):
    name = "é" * 127 + "x"                                # 255 bytes
    write_bytes_atomic(str(tmp_path / name), b"1")
    assert os.listdir(tmp_path) == [name]


def test_object_stores_get_the_finished_bytes_in_one_put(tmp_path):
    fs = fsspec.filesystem("memory")
    write_bytes_atomic("memory://bucket/dir/x.bin", b"payload")
    with AtomicFile("memory://bucket/dir/y.bin") as f:
        f.write(b"streamed")
        assert not fs.exists("/bucket/dir/y.bin")           # nothing visible before the end
    assert fs.cat("/bucket/dir/x.bin") == b"payload" and fs.cat("/bucket/dir/y.bin") == b"streamed"
    with pytest.raises(RuntimeError):
        with AtomicFile("memory://bucket/dir/z.bin") as f:
            f.write(b"partial")
            raise RuntimeError
    assert not fs.exists("/bucket/dir/z.bin")
    fs.rm("/bucket", recursive=True)
