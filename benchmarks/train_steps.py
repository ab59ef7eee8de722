"""Cached training steps per second at batch 128 on 2,560-d features (issue 19's CPU goal: >= 3x today's fit
loop): Keras `fit` (what devise.training.train runs) against the leanest loop Keras 3 allows on JAX (features held
on the device, one jitted step of `stateless_call` + `optimizer.stateless_apply` with donated state, no
data adapter or callbacks), in one process, for the linear head + hinge rank loss and the MLP head +
softmax over cosines. The data are seeded random arrays of the benchmark's shapes (3,072 images, 512
classes, 384-d MiniLM vectors): the seconds do not depend on the values.

If the lean loop is not faster, the fit loop's per-step overhead is not what limits training on this
machine: the step's arithmetic is. Prints RESULT {"head": .., "fit_steps_s": .., "lean_steps_s": .., "ratio": ..}
per head (medians over 3 epochs after the compiling one; two repeats).
"""
import json
import time

import devise  # noqa: F401
import jax
import jax.numpy as jnp
import keras
import numpy as np

from devise.models.heads import build_head
from devise.training.train import make_loss, shuffled_batches

IMAGES, FEATURES, CLASSES, DIM, BATCH = 3072, 2560, 512, 384, 128
rng = np.random.default_rng(0)
x = rng.standard_normal((IMAGES, FEATURES)).astype(np.float32)
y = rng.integers(0, CLASSES, IMAGES)
vectors = rng.standard_normal((CLASSES, DIM)).astype(np.float32)
vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)


def head_and_loss(head, loss, options):
    keras.utils.set_random_seed(0)
    return build_head(head, FEATURES, DIM), make_loss("devise", loss, vectors, **options)


def fit_steps_per_s(head, loss, options, epochs=3):
    model, loss_fn = head_and_loss(head, loss, options)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss_fn)
    batches, times = shuffled_batches(x, y, BATCH, 0), []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            batches.set_epoch(epoch)
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(batches, epochs=epochs + 1, verbose=0, callbacks=[Timer()], shuffle=False)
    return len(batches) / np.median(times[1:])


def lean_steps_per_s(head, loss, options, epochs=3):
    model, loss_fn = head_and_loss(head, loss, options)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])
    features, labels = jnp.asarray(x), jnp.asarray(y)

    def step(trainable, non_trainable, optimizer_vars, rows):
        def loss_of(trainable):
            out, updated = model.stateless_call(trainable, non_trainable, features[rows], training=True)
            return loss_fn(labels[rows], out), updated
        (value, non_trainable), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
        trainable, optimizer_vars = optimizer.stateless_apply(optimizer_vars, grads, trainable)
        return (trainable, non_trainable, optimizer_vars), value

    step = jax.jit(step, donate_argnums=(0, 1, 2))
    times = []
    for epoch in range(epochs + 1):
        order, start = np.random.default_rng(epoch).permutation(IMAGES), time.perf_counter()
        for i in range(0, IMAGES, BATCH):
            state, value = step(*state, jnp.asarray(order[i:i + BATCH]))
        value.block_until_ready()
        times.append(time.perf_counter() - start)
    return (IMAGES // BATCH) / np.median(times[1:])


if __name__ == "__main__":
    for head, loss, options in [("linear", "hinge", {}), ("mlp", "softmax", {"temperature": 0.1})]:
        for _ in range(2):
            fit, lean = fit_steps_per_s(head, loss, options), lean_steps_per_s(head, loss, options)
            print("RESULT " + json.dumps({"head": f"{head}+{loss}", "fit_steps_s": round(fit, 1),
                                          "lean_steps_s": round(lean, 1), "ratio": round(lean / fit, 2)}), flush=True)
