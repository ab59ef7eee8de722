"""The write protocol (devise.storage): locks between real processes, whole-folder publishing, manifests,
out-of-space errors as one line."""
import errno
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from devise.errors import DeviseError
from devise.storage import (atomic_save_npz, atomic_write, building_folder, check_free_space, check_manifest,
                            locked, write_manifest)


def test_lock_serialises_two_processes(tmp_path):
    """Two processes append under the lock: their begin/end lines never interleave."""
    log = tmp_path / "log.txt"
    code = textwrap.dedent(f"""
        import sys, time
        from devise.storage import locked
        for _ in range(3):
            with locked({str(tmp_path / 'target')!r}):
                with open({str(log)!r}, "a") as fh:
                    fh.write("begin " + sys.argv[1] + "\\n"); fh.flush(); time.sleep(0.05)
                    fh.write("end " + sys.argv[1] + "\\n")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, name]) for name in "ab"]
    assert [p.wait(60) for p in procs] == [0, 0]
    lines = log.read_text().split()
    pairs = list(zip(lines[0::4], lines[1::4], lines[2::4], lines[3::4]))
    assert len(pairs) == 6 and all(b == "begin" and e == "end" and w1 == w2 for b, w1, e, w2 in pairs)


def test_lock_released_when_holder_is_killed(tmp_path):
    target = tmp_path / "target"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from devise.storage import locked
        with locked({str(target)!r}):
            print("held", flush=True); time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(30)
    with locked(target, notice_after_s=30):  # would wait forever if the kernel kept the lock
        pass


def test_building_folder_replaces_whole_or_keeps_old(tmp_path):
    final = tmp_path / "result"
    with building_folder(final) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with building_folder(final) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("crash while building")
    assert (final / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["result"]


def test_write_error_is_one_line_and_keeps_old_file(tmp_path):
    path = tmp_path / "arrays.npz"
    atomic_save_npz(path, x=np.arange(3))

    def full_disk(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DeviseError, match=r"arrays.npz: cannot write \(no space left on device\)") as info:
        atomic_write(path, full_disk)
    assert "\n" not in str(info.value)
    assert np.load(path)["x"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["arrays.npz"]  # the partial file is gone


def test_check_free_space_refuses_in_one_line(tmp_path):
    check_free_space(tmp_path, 1 << 20)
    with pytest.raises(DeviseError, match="no space left on device"):
        check_free_space(tmp_path / "not" / "yet", 1 << 60, "features.npy")


def test_manifest_names_the_damaged_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "b.bin").write_bytes(b"y" * 100)
    write_manifest(tmp_path, kind="test")
    assert check_manifest(tmp_path)["kind"] == "test"
    (tmp_path / "b.bin").write_bytes(b"y" * 50)
    with pytest.raises(DeviseError, match=r"b.bin: damaged or replaced \(50 bytes"):
        check_manifest(tmp_path)
    (tmp_path / "b.bin").write_bytes(b"z" * 100)  # same size, other contents
    with pytest.raises(DeviseError, match="b.bin: damaged or replaced .*SHA-256"):
        check_manifest(tmp_path)
    check_manifest(tmp_path, hashes=False)  # sizes only: passes
    (tmp_path / "b.bin").unlink()
    with pytest.raises(DeviseError, match="b.bin: missing"):
        check_manifest(tmp_path)
