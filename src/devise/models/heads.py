"""Trainable heads on cached backbone features (keras layers only).

- linear_head: the paper's linear map M from visual features to the word space (no bias by default:
  the paper's M v(image) has none, and a bias would add the same vector to every image's projection).
- mlp_head: the Keras blog's head (Dropout 0.3, Dense 1024 relu, BatchNorm, Dense to the vector size).
- softmax_head: the phase-2 baseline classifier over the training classes (logistic regression by
  default; hidden=N adds one ReLU layer). Logistic regression was chosen on validation: on the emoji
  benchmark the one-layer MLP did not beat it (see train.py's docstring for the numbers).
"""
from __future__ import annotations

import inspect

import keras
from keras import layers

from devise.errors import DeviseError


def _normalized(inputs, input_dim: int, scale: bool):
    """Unit-length features (times sqrt(input_dim) when `scale`, so entries stay near 1 for the MLP's
    optimizer). Chosen on the emoji benchmark's validation classes: +4-5 points zero-shot hit@5 for the
    linear map, and the same or better for the MLP, against raw pooled features."""
    x = layers.UnitNormalization(name="unit_features")(inputs)
    return layers.Rescaling(float(input_dim) ** 0.5, name="scaled_features")(x) if scale else x


def linear_head(input_dim: int, output_dim: int, use_bias: bool = False, normalize_features: bool = True,
                name: str = "linear_head") -> keras.Model:
    """features (B, input_dim) -> projection M v (B, output_dim); v is unit-normalised first by default."""
    inputs = keras.Input((input_dim,), name="features")
    x = _normalized(inputs, input_dim, scale=False) if normalize_features else inputs
    outputs = layers.Dense(output_dim, use_bias=use_bias, name="M")(x)
    return keras.Model(inputs, outputs, name=name)


def mlp_head(input_dim: int, output_dim: int, hidden: int = 1024, dropout: float = 0.3,
             normalize_features: bool = True, name: str = "mlp_head") -> keras.Model:
    """The Keras blog's head: Dropout, Dense(hidden, relu), BatchNorm, Dense(output_dim) (on normalised features)."""
    inputs = keras.Input((input_dim,), name="features")
    x = _normalized(inputs, input_dim, scale=True) if normalize_features else inputs
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(hidden, activation="relu")(x)
    x = layers.BatchNormalization()(x)
    outputs = layers.Dense(output_dim, name="projection")(x)
    return keras.Model(inputs, outputs, name=name)


def softmax_head(input_dim: int, num_classes: int, hidden: int = 0, dropout: float = 0.0,
                 name: str = "softmax_head") -> keras.Model:
    """features (B, input_dim) -> class probabilities (B, num_classes)."""
    inputs = keras.Input((input_dim,), name="features")
    x = inputs
    if dropout:
        x = layers.Dropout(dropout)(x)
    if hidden:
        x = layers.Dense(hidden, activation="relu")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="classes")(x)
    return keras.Model(inputs, outputs, name=name)


# name -> builder(input_dim, output_dim, **options): what devise.training.train builds a head from by name.
# "linear" and "mlp" project to the label space (output_dim = its dimension); "softmax" classifies
# (output_dim = the number of classes). A new head is one more entry (and one more name in train.HEADS).
HEAD_BUILDERS = {"linear": linear_head, "mlp": mlp_head, "softmax": softmax_head}


def build_head(kind: str, input_dim: int, output_dim: int, **options) -> keras.Model:
    """Head by name (HEAD_BUILDERS): "linear" or "mlp" (projection to output_dim), "softmax" (output_dim classes)."""
    if kind not in HEAD_BUILDERS:
        raise DeviseError(f"unknown head '{kind}': choose one of {', '.join(HEAD_BUILDERS)}")
    accepted = list(inspect.signature(HEAD_BUILDERS[kind]).parameters)[2:]
    unknown = [name for name in options if name not in accepted]
    if unknown:
        raise DeviseError(f"the {kind} head has no {', '.join(unknown)} setting (it takes {', '.join(accepted)})")
    return HEAD_BUILDERS[kind](input_dim, output_dim, **options)


def ensemble_head(members, name: str = "ensemble_head") -> keras.Model:
    """Trained projection heads as one model: the mean of their unit-length outputs (the members were
    trained alone, each with its own seed; averaging them smooths out which epoch early stopping hit)."""
    inputs = keras.Input(members[0].input_shape[1:], name="features")
    outputs = []
    for i, member in enumerate(members):
        # A new (uncompiled: its training loss is not saved with it) model over the member's layers,
        # with a name of its own: nested models need distinct names in one functional model.
        member = keras.Model(member.inputs[0], member.outputs[0], name=f"member_{i}")
        outputs.append(layers.UnitNormalization(name=f"unit_{i}")(member(inputs)))
    return keras.Model(inputs, layers.Average(name="mean")(outputs), name=name)
