"""Read PyTorch checkpoints (state dicts) into numpy arrays without importing torch.

Two on-disk formats exist:
- legacy (torch < 1.6, what the packaged EfficientNet-Lite0 uses): consecutive pickles of a magic number,
  the protocol version, sys info, then the state dict whose tensors name their storage by persistent id,
  then the list of storage keys; after that each storage as an 8-byte little-endian element count followed
  by its raw little-endian data, in the order of that list.
- zip (torch >= 1.6): a zip holding `<prefix>/data.pkl` (the state dict, same persistent ids) and one raw
  file `<prefix>/data/<key>` per storage.

Unpickling only allows the few globals a state dict needs (no arbitrary code runs), so a hostile file
raises DeviseError instead of executing anything.
"""
from __future__ import annotations

import collections
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from devise.errors import DeviseError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# torch storage class name / dtype name -> numpy dtype (little-endian).
_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "bfloat16",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}
_TORCH_DTYPES = {
    "float32": "<f4", "float": "<f4", "float64": "<f8", "double": "<f8", "float16": "<f2", "half": "<f2",
    "bfloat16": "bfloat16", "int64": "<i8", "long": "<i8", "int32": "<i4", "int": "<i4", "int16": "<i2",
    "int8": "i1", "uint8": "u1", "bool": "?",
}


class _DType:
    """Stands in for a torch storage class or dtype inside the pickle: just remembers the numpy dtype."""

    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype

    def __call__(self, *args, **kwargs):  # torch.FloatStorage() may be called with no data
        return self


def _numpy_dtype(spec: str) -> np.dtype:
    if spec == "bfloat16":
        import ml_dtypes  # ships with jax; bfloat16 checkpoints are rare

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(spec)


class _StorageRef:
    """A storage named in the pickle; `array` is filled in once the raw data has been read."""

    def __init__(self, key: str, dtype: str, numel: int):
        self.key, self.dtype, self.numel = key, _numpy_dtype(dtype), numel
        self.array: np.ndarray | None = None


class _LazyTensor:
    """A tensor whose storage is not read yet (legacy format: data comes after the state dict)."""

    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialise(self) -> np.ndarray:
        data = self.storage.array
        if not self.size:
            return np.array(data[self.offset])
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size, strides=tuple(s * itemsize for s in self.stride))
        return np.ascontiguousarray(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_):
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a state dict, turning tensors into _LazyTensor and refusing unexpected globals."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _DType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _DType(name, _TORCH_DTYPES[name])
        if module == "torch" and name == "Size":
            return tuple
        raise DeviseError(f"{self.path}: unsupported object {module}.{name} in checkpoint (not a plain state dict)")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata]) in both formats.
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise DeviseError(f"{self.path}: unexpected persistent id {pid!r:.80} in checkpoint")
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) > 5 and pid[5] is not None:
            raise DeviseError(f"{self.path}: storage views (pre-1.0 checkpoints) are not supported")
        dtype = storage_type.dtype if isinstance(storage_type, _DType) else "<f4"
        if key not in self.storages:
            self.storages[key] = _StorageRef(str(key), dtype, int(numel))
        return self.storages[key]


def _to_arrays(state, path: Path) -> dict[str, np.ndarray]:
    # Some checkpoints wrap the state dict: {"state_dict": {...}} or {"model": {...}}.
    if isinstance(state, dict) and not any(isinstance(v, _LazyTensor) for v in state.values()):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict):
        raise DeviseError(f"{path}: checkpoint holds a {type(state).__name__}, not a state dict")
    return {str(k): v.materialise() for k, v in state.items() if isinstance(v, _LazyTensor)}


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != LEGACY_MAGIC:
            raise DeviseError(f"{path}: not a PyTorch checkpoint (neither zip nor legacy .pth)")
        pickle.load(f)  # protocol version
        sys_info = pickle.load(f)
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise DeviseError(f"{path}: big-endian checkpoints are not supported")
        unpickler = _StateDictUnpickler(f, path)
        state = unpickler.load()
        keys = pickle.load(f)
        for key in keys:
            ref = unpickler.storages.get(str(key))
            numel = int(np.frombuffer(f.read(8), "<i8")[0])
            dtype = ref.dtype if ref is not None else np.dtype("u1")
            raw = f.read(numel * dtype.itemsize)
            if len(raw) != numel * dtype.itemsize:
                raise DeviseError(f"{path}: checkpoint is truncated (storage {key})")
            if ref is not None:
                ref.array = np.frombuffer(raw, dtype)
    missing = [k for k, ref in unpickler.storages.items() if ref.array is None]
    if missing:
        raise DeviseError(f"{path}: checkpoint lacks data for storage(s) {missing[:3]}")
    return _to_arrays(state, path)


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("data.pkl")), None)
        if pkl is None:
            raise DeviseError(f"{path}: zip file without data.pkl, not a PyTorch checkpoint")
        prefix = pkl[: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and archive.read(byteorder).strip() != b"little":
            raise DeviseError(f"{path}: big-endian checkpoints are not supported")
        with archive.open(pkl) as f:
            unpickler = _StateDictUnpickler(f, path)
            state = unpickler.load()
        for key, ref in unpickler.storages.items():
            try:
                raw = archive.read(f"{prefix}data/{key}")
            except KeyError:
                raise DeviseError(f"{path}: checkpoint lacks data/{key}") from None
            ref.array = np.frombuffer(raw, ref.dtype)
    return _to_arrays(state, path)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch checkpoint (legacy .pth or zip) -> {parameter name: numpy array}, in file order.

    Raises DeviseError (one line) for a missing, truncated or non-checkpoint file.
    """
    path = Path(path)
    if not path.is_file():
        raise DeviseError(f"{path}: no such checkpoint file")
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        return _read_legacy(path)
    except DeviseError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError,
            KeyError, zipfile.BadZipFile, OSError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise DeviseError(f"{path}: not a readable PyTorch checkpoint ({exc.__class__.__name__}: {detail})") from None
