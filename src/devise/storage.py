"""The one write protocol for everything devise keeps on disk (caches, stores, runs, indexes, shards).

- A file is written to a temporary name in its folder and renamed over the target (`atomic_write`): a crash
  never leaves it half-written, and a reader sees the old file or the new one.
- A folder that is one result (a feature cache, an image store, a run's checkpoint) is built under a temporary
  name and renamed into place whole (`publish_folder`, `building_folder`): never replaced part by part.
- Writers of the same result take an exclusive lock first (`locked`): the second waits, then finds the result
  complete and uses it instead of writing it again. The lock is fcntl.flock on a `<name>.lock` file beside the
  target, so the kernel releases it when its holder dies (SIGKILL included): a crashed run never blocks the next.
- A manifest (`write_manifest`, `check_manifest`) records each file's size and SHA-256, so a damaged or swapped
  file is named in one line instead of failing deep inside numpy or Keras.
- Every OSError while writing (a full disk, no permission) becomes one DeviseError line naming the path and the
  cause; the partial files are removed and the earlier result kept (`write_errors`). Memory-mapped outputs are
  preallocated only after `check_free_space`: a write into a sparse file on a full disk dies with SIGBUS.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from devise.errors import DeviseError

MANIFEST = "manifest.json"
FREE_SPACE_MARGIN = 64 << 20  # bytes kept free beyond a preallocation (metadata, other writers)


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    return exc.strerror or str(exc)


def os_error_line(exc: OSError) -> str:
    """An OSError as one line: the path it names (both, for a rename) and the cause."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"{paths}: {_reason(exc)}" if paths else _reason(exc)


@contextmanager
def write_errors(path: str | os.PathLike, cleanup=()):
    """Turn an OSError raised inside into one DeviseError line naming `path` and the cause; the paths in
    `cleanup` (partial files or folders) are removed first."""
    try:
        yield
    except OSError as exc:
        for partial in cleanup:
            remove(partial)
        raise DeviseError(f"{path}: cannot write ({_reason(exc)})") from None


def remove(path: str | os.PathLike) -> None:
    """Remove a file or folder if it exists (best effort: used while cleaning up after an error)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write a file so a crash never leaves it half-written: write(tmp_path) into a temporary file in the
    same folder, then rename it over `path` (atomic on POSIX). An OSError is one line naming `path`."""
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    try:
        with write_errors(path, cleanup=[tmp]):
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj, **dumps_kwargs) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, **dumps_kwargs)))


def atomic_save_npz(path: str | os.PathLike, **arrays) -> None:
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, write)


def atomic_save_npy(path: str | os.PathLike, array) -> None:
    def write(tmp):
        with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to a bare name
            np.save(fh, array)

    atomic_write(path, write)


# ---------------------------------------------------------------- reading caches back

def discard_damaged(path: str | os.PathLike, why: str) -> None:
    """A cache file or folder that cannot be read whole is said in one line (a warning), removed and so
    recomputed by the caller: never trusted, never a traceback from deep inside numpy or zipfile."""
    why = " ".join(str(why).split())  # one line, whatever the library's message holds
    warnings.warn(f"{path}: damaged cache ({why}); removed, computing it again", stacklevel=3)
    remove(path)


def read_npz(path: str | os.PathLike, keys, discard: bool = True) -> dict | None:
    """The arrays `keys` of the .npz cache `path`, read whole; None when it is missing or damaged (truncated,
    not a zip, a key missing, unreadable), which with `discard` is said and removed (discard_damaged)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in keys}
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - BadZipFile, EOFError, zlib.error, ValueError, KeyError, OSError
        if discard:
            discard_damaged(path, f"{type(exc).__name__}: {exc}")
        return None


def remove_partials(target: str | os.PathLike) -> None:
    """Remove what writers of `target` that died (SIGKILL, power loss) left: its temporary files and folders
    (`.NAME.*.tmp`, as atomic_write and building_folder name them). Only with locked(target) held, and only
    for targets every writer of which takes that lock (else a live writer's file could go)."""
    target = Path(target)
    for partial in target.parent.glob(f".{target.name}.*.tmp"):
        remove(partial)


def cached_npz(path: str | os.PathLike, keys, compute, invalid=lambda arrays: None) -> dict:
    """The arrays of the .npz cache `path`: read back when whole and `invalid(arrays)` finds nothing wrong
    (it returns the reason: a shape, non-finite values), else compute() -> {key: array}, saved atomically.
    Computed under locked(path): concurrent first users compute it once, the others wait and read it. A
    damaged file is said in one line, removed and computed again."""
    def read(discard: bool):
        arrays = read_npz(path, keys, discard)
        why = invalid(arrays) if arrays is not None else None
        if why and discard:
            discard_damaged(path, why)
        return None if why else arrays

    arrays = read(discard=False)  # the common case takes no lock (a reader sees whole files only)
    if arrays is None:
        with locked(path):
            arrays = read(discard=True)
            if arrays is None:
                remove_partials(path)
                arrays = compute()
                atomic_save_npz(path, **arrays)
    return arrays


# ---------------------------------------------------------------- locks

def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


@contextmanager
def locked(target: str | os.PathLike, shared: bool = False, notice_after_s: float = 1.0):
    """Hold an exclusive (or shared) lock on `target` (a file or folder, which need not exist) for the block.

    Another process asking for the same target waits; after `notice_after_s` it says once on stderr whom
    it waits for. The lock file stays (removing it would race with a waiter); it is empty.
    """
    path = lock_path(target)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        deadline = time.monotonic() + notice_after_s
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    print(f"devise: waiting for another devise process writing {target}", file=sys.stderr, flush=True)
                    fcntl.flock(fd, mode)
                    break
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ---------------------------------------------------------------- whole folders

def publish_folder(built: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished folder `built` into place as `final`, replacing an older one whole. Call it with
    `locked(final)` held: between the two renames a reader without the lock may briefly find no folder."""
    built, final = Path(built), Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    with write_errors(final):
        if final.exists():
            os.replace(final, old)
        os.replace(built, final)
    remove(old)


@contextmanager
def building_folder(final: str | os.PathLike):
    """Yield a new empty folder beside `final`; when the block ends normally it replaces `final` whole
    (publish_folder), on an error it is removed and `final` is left as it was. Holds `locked(final)`."""
    final = Path(final)
    with locked(final):
        with write_errors(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
        try:
            with write_errors(final, cleanup=[tmp]):
                yield tmp
            publish_folder(tmp, final)
        except BaseException:
            remove(tmp)
            raise


def check_free_space(folder: str | os.PathLike, nbytes: int, what: str = "") -> None:
    """Refuse in one line to preallocate `nbytes` in `folder` when the disk cannot hold them (a memory-mapped
    write into a sparse file on a full disk is killed by SIGBUS, with no message)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    margin = min(FREE_SPACE_MARGIN, max(nbytes // 4, 1 << 20))  # a small file needs a small margin
    if free < nbytes + margin:
        need = (nbytes + margin) / 2**20
        raise DeviseError(f"{folder}: cannot write {what or 'its files'} (no space left on device: needs "
                          f"{need:,.0f} MiB, {free / 2**20:,.0f} MiB free)")


def preallocate(path: str | os.PathLike) -> None:
    """Give a sparse file (np.lib.format.open_memmap's) its disk blocks now: a memory-mapped write into a hole
    on a full disk is killed by SIGBUS, while the allocation fails here with ENOSPC, said in one line. Also
    for a resumed file, whose unwritten chunks are still holes that check_free_space cannot see."""
    if not hasattr(os, "posix_fallocate"):  # not on macOS: check_free_space is the guard there
        return
    with write_errors(path):
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size:
                os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- manifests

def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike, names=None, hashes: bool = True, **extra) -> dict:
    """Record the size and SHA-256 of `names` (default: every file in `folder` but the manifest and hidden
    files) in folder/manifest.json, atomically; `extra` keys are stored beside them. hashes=False records
    sizes only (caches of many GB, checked by size and by their contents' sanity instead)."""
    folder = Path(folder)
    if names is None:
        names = sorted(f.name for f in folder.iterdir()
                       if f.is_file() and f.name != MANIFEST and not f.name.startswith("."))
    manifest = {"files": file_entries(folder, names, hashes), **extra}
    atomic_write_json(folder / MANIFEST, manifest, indent=1, sort_keys=True)
    return manifest


def file_entries(folder: str | os.PathLike, names, hashes: bool = True) -> dict:
    """{name: {"size", "sha256"}} of the files `names` in `folder` (what a manifest lists; check_files checks)."""
    files = {name: {"size": (Path(folder) / name).stat().st_size} for name in names}
    if hashes:
        for name, entry in files.items():
            entry["sha256"] = file_sha256(Path(folder) / name)
    return files


def check_manifest(folder: str | os.PathLike, hashes: bool = True, required: bool = False) -> dict | None:
    """Check folder's files against its manifest: DeviseError naming the first file that is missing, of
    another size or (hashes=True) of other contents. No manifest: None (or an error when required)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if required:
            raise DeviseError(f"{folder}: no {MANIFEST} (not a finished result, or written by an older devise)")
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DeviseError(f"{path}: unreadable manifest ({exc})") from None
    check_files(folder, files, MANIFEST, hashes)
    return manifest


def check_files(folder: str | os.PathLike, files: dict, source: str = MANIFEST, hashes: bool = True) -> None:
    """DeviseError naming the first of `files` ({name: {"size", "sha256"?}}, as a manifest lists them, read
    from `source`) that is missing from `folder`, of another size or (hashes=True) of other contents."""
    folder = Path(folder)
    for name, want in files.items():
        file = folder / name
        if not file.is_file():
            raise DeviseError(f"{file}: missing (listed in {source})")
        size = file.stat().st_size
        if size != want["size"]:
            raise DeviseError(f"{file}: damaged or replaced ({size:,} bytes, {source} says {want['size']:,})")
        if hashes and "sha256" in want and file_sha256(file) != want["sha256"]:
            raise DeviseError(f"{file}: damaged or replaced (its SHA-256 does not match {source})")


# ---------------------------------------------------------------- a result folder filled chunk by chunk

class ChunkedArrays:
    """A result folder of preallocated .npy files filled chunk by chunk (a feature cache, an image store): the
    chunks done are kept in done.json, so a crashed writer resumes; `finish` publishes the folder whole.

    Only the holder of `locked(folder)` may make one (its .partial folder is that writer's alone)."""

    def __init__(self, folder: Path, shapes: dict[str, tuple], dtypes: dict[str, str], n_chunks: int):
        self.final = folder
        self.partial = folder.with_name(folder.name + ".partial")
        self.partial.mkdir(parents=True, exist_ok=True)
        self.done_file = self.partial / "done.json"
        try:
            self.done: set[int] = set(json.loads(self.done_file.read_text())) if self.done_file.exists() else set()
        except ValueError:  # a damaged progress file: start over
            self.done = set()
        self.arrays = {}
        opened = {}
        for name, shape in shapes.items():
            path = self.partial / f"{name}.npy"
            if path.exists() and self.done:
                try:
                    arr = np.load(path, mmap_mode="r+")
                    if arr.shape == shape and arr.dtype == np.dtype(dtypes[name]):
                        opened[name] = arr
                except (ValueError, OSError):  # truncated by a crash or a full disk: start over
                    pass
        if len(opened) != len(shapes):  # a different or damaged run left this: start over
            self.done, opened = set(), {}
        missing = {n: s for n, s in shapes.items() if n not in opened}
        need = sum(int(np.prod(s)) * np.dtype(dtypes[n]).itemsize for n, s in missing.items())
        check_free_space(self.partial, need, " and ".join(f"{n}.npy" for n in missing))
        for name in shapes:
            self.arrays[name] = opened[name] if name in opened else \
                np.lib.format.open_memmap(self.partial / f"{name}.npy", "w+", dtypes[name], shapes[name])
            preallocate(self.partial / f"{name}.npy")  # no holes left for a write to die in (SIGBUS)
        self.n_chunks = n_chunks

    def mark_done(self, chunk: int) -> None:
        for arr in self.arrays.values():
            arr.flush()
        self.done.add(chunk)
        atomic_write_json(self.done_file, sorted(self.done))

    def finish(self, meta: dict) -> None:
        for arr in self.arrays.values():
            arr.flush()
        self.arrays = {}  # unmapped before the files move
        atomic_write_json(self.partial / "meta.json", meta)
        self.done_file.unlink(missing_ok=True)
        write_manifest(self.partial, hashes=False)  # sizes: hashing a store of many GB would cost minutes
        publish_folder(self.partial, self.final)
