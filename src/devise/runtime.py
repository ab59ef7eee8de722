"""How models run: compiled forward passes, devices, and Keras' distribution API.

This is the one module outside the CLI that may talk to the backend (JAX) directly; model code never does.
On JAX the forward pass is a jitted `stateless_call`: no per-batch variable sync as in
`predict_on_batch`, outputs stay on the device until asked for, and when a Keras distribution is set
(`use_devices`) the batch is sharded across devices while the weights are replicated.

Compiled programs persist on disk (`enable_compilation_cache`, called by `import devise`): a new process
loads the backbone's forward instead of compiling it again. Keras and JAX are imported inside the
functions, so `import devise` (which imports this module) stays fast.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from devise.assets import data_home
from devise.storage import atomic_write

if TYPE_CHECKING:  # for annotations only: Keras is imported where it runs
    import keras

COMPILATION_CACHE_SETTINGS = {
    # JAX by default keeps only programs that took >= 1 s to compile; ours (a forward on a fast machine,
    # ConSE and ranking ops) often take less, and a cold start pays every one of them.
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": -1,  # -1: no size floor (0 would let JAX pick one)
}


def enable_compilation_cache(folder: str | os.PathLike | None = None) -> str | None:
    """Keep JAX's compiled programs in `folder` (default <data home>/jax-cache) across processes.

    A user's own cache (JAX_COMPILATION_CACHE_DIR, or jax_compilation_cache_dir set before) wins, as do
    their own thresholds. Must run before the first compilation: JAX reads the folder once. Returns the
    folder in use (None if the cache is off)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if folder is None:
        folder = data_home(create=False) / "jax-cache"  # JAX makes the folder at its first write
    jax = sys.modules.get("jax")
    if jax is None:  # the usual case: JAX reads these when it is imported (with Keras), not before
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
        for name, value in COMPILATION_CACHE_SETTINGS.items():
            os.environ.setdefault(name.upper(), str(value))
        return str(folder)
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(folder))
    for name, value in COMPILATION_CACHE_SETTINGS.items():
        if name.upper() not in os.environ:
            jax.config.update(name, value)
    return str(folder)


def platform() -> str:
    """'cpu', 'gpu' or 'tpu': where Keras will run."""
    import keras

    if keras.config.backend() == "jax":
        import jax

        return jax.default_backend()
    if keras.config.backend() == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    return "cpu"


def to_tensor(array):
    """A numpy array as a backend tensor, with no compiled program: on JAX a device_put (jnp.asarray would
    compile a conversion per shape, ~0.1-0.4 s each on 2 cores: dozens when building a model)."""
    import keras

    if keras.config.backend() == "jax":
        import jax

        return jax.device_put(array)
    return keras.ops.convert_to_tensor(array)


def device_count() -> int:
    """Devices every batch is split across: those of the Keras distribution set by use_devices, else 1."""
    import keras

    distribution = keras.distribution.distribution()
    return 1 if distribution is None else int(distribution.device_mesh.devices.size)


def process_index_and_count() -> tuple[int, int]:
    """(this process's index, number of processes): (0, 1) unless several hosts joined (use_devices)."""
    import keras

    if keras.config.backend() == "jax":
        import jax

        return jax.process_index(), jax.process_count()
    return 0, 1


def default_batch_size() -> int:
    """Images per forward batch: tiny on a CPU, where a batch that stays in cache runs fastest
    (EfficientNet-Lite0 on 2 cores, medians: 71 / 84 / 63 / 63 images/s at batch 1 / 2 / 4 / 8),
    large on an accelerator."""
    return 2 * device_count() if platform() == "cpu" else 256 * device_count()


def use_devices(count: int | None = None, *, multi_host: bool = False):
    """Shard batches across `count` devices (all by default) with keras.distribution.DataParallel.

    multi_host=True first joins the other hosts: keras.distribution.initialize (which calls
    jax.distributed.initialize) reads KERAS_DISTRIBUTION_JOB_ADDRESSES (the coordinator's host:port),
    KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID. Returns the distribution, or
    None with a single device.
    """
    import keras

    if multi_host:
        keras.distribution.initialize()
    devices = keras.distribution.list_devices()
    if count:
        devices = devices[:count]
    if len(devices) < 2:
        keras.distribution.set_distribution(None)
        return None
    distribution = keras.distribution.DataParallel(devices=devices)
    # Our batch iterators (devise.training.train.shuffled_batches) already give each host its slice of every batch.
    distribution.auto_shard_dataset = process_index_and_count()[1] == 1
    keras.distribution.set_distribution(distribution)
    return distribution


def pad_batch(batch, size: int):
    """batch (as numpy) with zero rows appended up to `size`: one compiled shape, not a recompile per length."""
    batch = np.asarray(batch)
    if len(batch) >= size:
        return batch
    return np.concatenate([batch, np.zeros((size - len(batch),) + batch.shape[1:], batch.dtype)])


def predict_in_batches(model: keras.Model, x, batch_size: int = 1024):
    """model(x) in fixed-size batches through compiled_forward, as numpy (a single output model).

    Unlike model.predict, it also runs when a distribution spans devices or hosts: every batch, the
    last one padded, splits evenly across the devices and the outputs are readable on every host.
    """
    forward = cached_forward(model)
    batch_size = -(-batch_size // device_count()) * device_count()
    batch_size = min(batch_size, -(-len(x) // device_count()) * device_count())
    outputs = []
    for start in range(0, len(x), batch_size):
        count = min(batch_size, len(x) - start)
        outputs.append((forward(pad_batch(x[start:start + batch_size], batch_size)), count))  # dispatched; read back below, so the device never waits
    if not outputs:
        return np.zeros((0,) + tuple(model.output_shape[1:]), np.float32)
    return np.concatenate([np.asarray(out)[:count] for out, count in outputs])


def cached_forward(model: keras.Model):
    """compiled_forward(model), kept on the model for the current distribution: later calls reuse the
    compiled program, which goes away with the model (a module-level cache would keep every model alive)."""
    import keras

    distribution = keras.distribution.distribution()
    cached = model.__dict__.get("_devise_forward")
    if cached is None or cached[0] is not distribution:
        with _forward_lock:  # concurrent first callers (a server's first requests) share one
            cached = model.__dict__.get("_devise_forward")
            if cached is None or cached[0] is not distribution:
                cached = (distribution, compiled_forward(model))
                object.__setattr__(model, "_devise_forward", cached)  # plain attribute: not tracked by Keras
    return cached[1]


_forward_lock = threading.Lock()


def compiled_forward(model: keras.Model):
    """f(batch) -> outputs (device arrays on JAX; call np.asarray when needed), compiled once per batch shape.

    The batch size must divide evenly across devices when a distribution is set.
    """
    import keras

    if keras.config.backend() != "jax":
        return model.predict_on_batch
    import jax

    distribution = keras.distribution.distribution()
    replicated = None
    if distribution is not None:
        mesh = distribution.device_mesh.backend_mesh
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    cache = {"source": None, "state": None}

    def current_state():
        # Read the variables at call time: Keras' own predict/fit replace (and delete) their buffers.
        source = [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]
        old = cache["source"]
        if old is None or any(a is not b for a, b in zip(old[0] + old[1], source[0] + source[1])):
            cache["source"] = source
            cache["state"] = jax.device_put(source, replicated) if replicated is not None else source
        return cache["state"]

    def forward(trainable, non_trainable, x):
        outputs, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        return outputs

    processes = process_index_and_count()[1]
    # On several hosts the outputs are gathered onto every device (on the device, asynchronously): a
    # sharded output could not be read back by any one process. On one host each shard is read directly.
    several_hosts = replicated is not None and processes > 1
    if distribution is None:
        forward = _exported_forward(model, forward)
    else:
        forward = jax.jit(forward, out_shardings=replicated) if several_hosts else jax.jit(forward)

    def call(x, process_local: bool = False):
        # process_local: x is this host's slice of the batch (each host feeds its own, in host order)
        if distribution is not None:
            shape = (len(x) * (processes if process_local else 1),) + tuple(x.shape[1:])
            layout = distribution.get_data_layout(shape).backend_layout
            if process_local:
                x = jax.make_array_from_process_local_data(layout, x, shape)
            else:
                x = jax.device_put(x, layout)
        trainable, non_trainable = current_state()
        return forward(trainable, non_trainable, x)

    return call


EXPORT_VERSION = "2"  # bump if what the exported forward computes changes in a way the key below misses (2: SHA-256 header)


def _model_code_digest(model) -> str:
    """What decides the traced program besides the arguments: the model's architecture (its JSON config:
    layers, their settings, dtype policies), the source files of its non-Keras layer classes, and the
    Keras/JAX versions."""
    import jax
    import keras

    sha = hashlib.sha256(f"{EXPORT_VERSION}|{keras.__version__}|{jax.__version__}|{jax.default_backend()}|"
                         f"{jax.devices()[0].device_kind}|{jax.config.jax_enable_x64}".encode())
    sha.update(model.to_json().encode())
    files = {inspect.getsourcefile(type(layer)) for layer in model._flatten_layers()
             if not type(layer).__module__.startswith("keras.")}
    for name in sorted(f for f in files if f):
        sha.update(Path(name).read_bytes())
    return sha.hexdigest()


def _read_exported(path: Path):
    """The jax.export program in `path` (a SHA-256 of the rest, then the serialized program), or None when it
    is absent or damaged: a truncated or altered file is exported again, never deserialized (altered StableHLO
    fails only when first called, outside any fallback)."""
    import jax

    try:
        data = path.read_bytes()
    except OSError:
        return None
    digest, payload = data[:32], data[32:]
    if hashlib.sha256(payload).digest() != digest:
        return None
    try:
        return jax.export.deserialize(bytearray(payload))
    except Exception:  # noqa: BLE001 - written by another jax version: exported again
        return None


def _exported_forward(model, forward):
    """jax.jit(forward), but the traced program is kept on disk (jax.export) in <data home>/exported:
    tracing a backbone through Keras' layers costs ~1 s of Python per process and batch shape, loading it
    ~10 ms, and with the compilation cache a new process then neither traces nor compiles. Any failure to
    export or load falls back to tracing, as before."""
    import jax

    traced = jax.jit(forward)
    if importlib.util.find_spec("flatbuffers") is None:  # jax.export serializes with it (a dependency; kept optional)
        return traced
    programs = {}
    first_call = threading.Lock()

    def call(trainable, non_trainable, x):
        signature = jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), (trainable, non_trainable, x))
        program = programs.get(str(signature))
        if program is not None:
            return program(trainable, non_trainable, x)
        # A new shape is exported and compiled (by its first call) once, under a lock: threads arriving at
        # once (a server's first requests) would otherwise each trace and compile it (30 first text queries:
        # 0.75 -> 7.3 GB peak RSS, benchmarks/serve_first_use.py).
        with first_call:
            program = programs.get(str(signature))
            if program is not None:
                return program(trainable, non_trainable, x)
            try:
                if "digest" not in programs:
                    programs["digest"] = _model_code_digest(model)
                key = hashlib.sha256(f"{programs['digest']}|{signature}".encode()).hexdigest()[:32]
                path = data_home() / "exported" / f"{key}.bin"
                exported = _read_exported(path)
                if exported is None:
                    exported = jax.export.export(traced)(*jax.tree_util.tree_map(
                        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (trainable, non_trainable, x)))
                    payload = bytes(exported.serialize())
                    atomic_write(path, lambda tmp: Path(tmp).write_bytes(hashlib.sha256(payload).digest() + payload))
                program = jax.jit(exported.call)
            except Exception as exc:  # noqa: BLE001 - exporting is an optimisation, never a failure
                logging.getLogger(__name__).debug("forward not exported (%s: %s); tracing", type(exc).__name__, exc)
                program = traced
            outputs = program(trainable, non_trainable, x)
            programs[str(signature)] = program
            return outputs

    return call


def gather_from_hosts(x):
    """np.stack of x from every host, in host order: (processes, *x.shape); (1, *x.shape) on one host."""
    if process_index_and_count()[1] == 1:
        return np.asarray(x)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=False))
