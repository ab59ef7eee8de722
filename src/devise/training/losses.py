"""DeViSE losses (keras.ops only, any backend): the paper's hinge rank loss and the Keras blog's cosine loss.

Both take y_true = integer label index into the TRAINING label set and y_pred = the image's projection
M v(image) of shape (B, D); the training label vectors T (C, D), unit rows, are a constant of the loss.

The hinge rank loss (Frome et al. 2013, eq. 1):
    loss(v, y) = sum over j != y of max(0, margin - t_y . Mv + t_j . Mv)
with negatives j drawn only from the training labels. `truncated=True` keeps, as the paper did, only the
first margin-violating negative met in a random order (a WARP-like stochastic approximation): every
(sample, label) pair draws a uniform random key, and the violating negative with the smallest key is
the one "met first". The draw is vectorised (no Python loop per sample).
"""
from __future__ import annotations

import keras
from keras import ops

from devise.labels.vectors import unit_rows


def _l2_normalize(x):
    return x / ops.sqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), 1e-12))


def _label_indices(y_true):
    y_true = ops.cast(ops.reshape(y_true, (-1,)), "int32")
    return y_true


def hinge_rank_terms(y_true, y_pred, label_vectors, margin=0.1, normalize_output=False):
    """Per-(sample, negative) hinge terms max(0, margin - t_y.p + t_j.p), zero at j == y: shape (B, C)."""
    if normalize_output:
        y_pred = _l2_normalize(y_pred)
    y = _label_indices(y_true)
    scores = ops.matmul(y_pred, ops.transpose(label_vectors))            # (B, C): t_j . Mv
    num_labels = ops.shape(label_vectors)[0]
    is_true = ops.one_hot(y, num_labels, dtype=scores.dtype)            # (B, C)
    true_score = ops.sum(scores * is_true, axis=1, keepdims=True)       # (B, 1): t_y . Mv
    terms = ops.relu(margin - true_score + scores)
    return terms * (1.0 - is_true)


def hinge_rank_loss(y_true, y_pred, label_vectors, margin=0.1, truncated=True, keys=None,
                    normalize_output=False):
    """Per-sample hinge rank loss, shape (B,).

    truncated=False: the full sum over negatives. truncated=True: the term of the margin-violating
    negative with the smallest key in `keys` (B, C) (the first violator met in the random order the
    keys define), 0 when no negative violates the margin. `keys` must be given when truncated.
    """
    terms = hinge_rank_terms(y_true, y_pred, label_vectors, margin, normalize_output)
    if not truncated:
        return ops.sum(terms, axis=1)
    if keys is None:
        raise ValueError("truncated hinge rank loss needs random keys (B, C)")
    keys = ops.cast(keys, terms.dtype)
    violates = terms > 0
    # Non-violators get a key above every real key so argmin picks the first violator met.
    ordered_keys = ops.where(violates, keys, ops.max(keys) + 1.0)
    first = ops.argmin(ordered_keys, axis=1)                            # (B,)
    picked = ops.one_hot(first, ops.shape(terms)[1], dtype=terms.dtype)
    return ops.sum(terms * picked, axis=1)                              # 0 when no violator (term is 0)


@keras.saving.register_keras_serializable(package="devise")
class HingeRankLoss(keras.losses.Loss):
    """The paper's hinge rank loss as a Keras loss (use in model.compile).

    label_vectors: (C, D) training label vectors (rows are unit-normalised here), held as a constant.
    margin: 0.1, a fraction of the unit norm (the paper's value).
    truncated: True = the paper's truncated sum (one random violating negative); False = full sum.
    normalize_output: False (default, the paper) scores the raw dot product t . Mv; True scores the
        cosine. Validation on the emoji benchmark's validation classes (see train.py) picked the default.
    seed: seeds the random order of negatives. The keys come from a keras SeedGenerator
        (`self.seed_generator`); under JAX its state must be a variable the trainer threads through
        the jitted step, so train.py attaches it to the model (see `attach_seed_state`).
    """

    def __init__(self, label_vectors, margin=0.1, truncated=True, normalize_output=False, seed=None,
                 name="hinge_rank_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.label_vectors_np = unit_rows(label_vectors, strict=True)
        self.label_vectors = ops.convert_to_tensor(self.label_vectors_np)
        self.margin = float(margin)
        self.truncated = bool(truncated)
        self.normalize_output = bool(normalize_output)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if truncated else None

    def call(self, y_true, y_pred):
        keys = None
        if self.truncated:
            batch = ops.shape(y_pred)[0]
            keys = keras.random.uniform((batch, self.label_vectors_np.shape[0]), seed=self.seed_generator)
        return hinge_rank_loss(y_true, y_pred, self.label_vectors, self.margin, self.truncated, keys,
                               self.normalize_output)

    def get_config(self):
        # The label matrix is not serialised (it can be large): runs store it in labels.npz and
        # rebuild the loss themselves; saved models are loaded with compile=False.
        return {"name": self.name, "margin": self.margin, "truncated": self.truncated,
                "normalize_output": self.normalize_output, "seed": self.seed}


def cosine_loss(y_true, y_pred, label_vectors):
    """Per-sample 1 - cos(y_pred, t_y), shape (B,)."""
    targets = ops.take(label_vectors, _label_indices(y_true), axis=0)
    return 1.0 - ops.sum(_l2_normalize(y_pred) * targets, axis=1)


@keras.saving.register_keras_serializable(package="devise")
class CosineLoss(keras.losses.Loss):
    """The Keras blog's DeViSE loss: 1 - cos(prediction, t_y) (L2 regression on unit vectors, up to a constant)."""

    def __init__(self, label_vectors, name="cosine_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.label_vectors_np = unit_rows(label_vectors, strict=True)
        self.label_vectors = ops.convert_to_tensor(self.label_vectors_np)
        self.seed_generator = None

    def call(self, y_true, y_pred):
        return cosine_loss(y_true, y_pred, self.label_vectors)

    def get_config(self):
        return {"name": self.name}


def softmax_rank_loss(y_true, y_pred, label_vectors, temperature=0.1):
    """Per-sample cross-entropy of softmax(cos(y_pred, t_j) / temperature) over the training labels.

    A ranking loss like the hinge (the true label must out-score every negative), but smooth: every
    negative pulls in proportion to how close it is, instead of a fixed margin.
    """
    logits = ops.matmul(_l2_normalize(y_pred), ops.transpose(label_vectors)) / temperature
    return keras.losses.sparse_categorical_crossentropy(_label_indices(y_true), logits, from_logits=True)


@keras.saving.register_keras_serializable(package="devise")
class SoftmaxRankLoss(keras.losses.Loss):
    """softmax_rank_loss as a Keras loss: cross-entropy over cosines to the training labels' vectors,
    scaled by 1/temperature (as CLIP scores images against texts, with the label vectors fixed)."""

    def __init__(self, label_vectors, temperature=0.1, name="softmax_rank_loss",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.label_vectors_np = unit_rows(label_vectors, strict=True)
        self.label_vectors = ops.convert_to_tensor(self.label_vectors_np)
        self.temperature = float(temperature)
        self.seed_generator = None

    def call(self, y_true, y_pred):
        return softmax_rank_loss(y_true, y_pred, self.label_vectors, self.temperature)

    def get_config(self):
        return {"name": self.name, "temperature": self.temperature}
