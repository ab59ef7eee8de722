"""How models run: compiled forward passes, devices, and Keras' distribution API.

This is the one module outside the CLI that may talk to the backend (JAX) directly; model code never does.
On JAX the forward pass is a jitted `stateless_call`: no per-batch variable sync as in
`predict_on_batch`, outputs stay on the device until asked for, and when a Keras distribution is set
(`use_devices`) the batch is sharded across devices while the weights are replicated.
"""
from __future__ import annotations

import keras


def platform() -> str:
    """'cpu', 'gpu' or 'tpu': where Keras will run."""
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


def device_count() -> int:
    if keras.config.backend() == "jax":
        import jax

        return jax.device_count()
    return 1


def default_batch_size() -> int:
    """Images per forward batch: tiny on a CPU, where a batch that stays in cache runs fastest
    (EfficientNet-Lite0 on 2 cores, medians: 71 / 84 / 63 / 63 images/s at batch 1 / 2 / 4 / 8),
    large on an accelerator."""
    return 2 * device_count() if platform() == "cpu" else 256 * device_count()


def use_devices(count: int | None = None, *, multi_host: bool = False):
    """Shard batches across `count` devices (all by default) with keras.distribution.DataParallel.

    multi_host=True first joins the other hosts (keras.distribution.initialize wraps
    jax.distributed.initialize; set the coordinator address, process count and id in the environment
    as JAX documents). Returns the distribution, or None with a single device.
    """
    if multi_host:
        keras.distribution.initialize()
    devices = keras.distribution.list_devices()
    if count:
        devices = devices[:count]
    if len(devices) < 2:
        keras.distribution.set_distribution(None)
        return None
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)
    return distribution


def compiled_forward(model: keras.Model):
    """f(batch) -> outputs (device arrays on JAX; call np.asarray when needed), compiled once per batch shape.

    The batch size must divide evenly across devices when a distribution is set.
    """
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

    @jax.jit
    def forward(trainable, non_trainable, x):
        outputs, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        return outputs

    def call(x):
        if distribution is not None:
            x = jax.device_put(x, distribution.get_data_layout(x.shape).backend_layout)
        trainable, non_trainable = current_state()
        return forward(trainable, non_trainable, x)

    return call
