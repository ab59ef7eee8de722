"""ImageNet-pretrained image backbones as Keras 3 models that take uint8 RGB and do their own preprocessing.

`load_backbone(name, weights)` -> Backbone with
- features_model: uint8 (B, S, S, 3) -> float32 pooled features (B, feature_dim), S = Backbone.image_size
- classifier: features -> 1000 ImageNet-1K logits

Backbones (the registry BACKBONES, `list_backbones()`; adding one is one entry):
- efficientnet_lite0 (default, 224 px) and efficientnet_lite2 (260 px): the architecture of
  efficientnet-lite-pytorch 0.1.0 (ReLU6, no squeeze-excite, fixed stem/head, TF "same" padding; Lite
  variants differ only in width/depth multipliers and resolution), weights read from the packaged PyTorch
  checkpoints without torch, ImageNet mean/std normalisation as that package's users apply it. Batch norm
  is folded into the convolutions (inference-only backbone: same numbers, fewer passes over memory).
- resnet50: keras.applications.ResNet50 with its Caffe preprocessing, weights from a local .h5/.keras
  file (`weights=PATH`) or "imagenet" (downloads, needs internet).

The EfficientNet-Lite layers are created with the checkpoint's arrays as their initial values: no random
initializer runs (each one was a separate XLA compilation, ~13 s of a cold start on 2 CPU cores).
"""
from __future__ import annotations

import hashlib
import inspect
import math
import os
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

import keras
from keras import ops

from devise import defaults
from devise.assets import efficientnet_lite0_checkpoint, efficientnet_lite2_checkpoint, imagenet1k_classes
from devise.errors import DeviseError
from devise.runtime import platform, to_tensor
from devise.models.torch_checkpoint import load_state_dict

# Bump when the preprocessing or the graph changes in a way that changes features (invalidates caches).
PREPROCESSING_VERSION = "1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
BN_EPS = 1e-3  # efficientnet-lite-pytorch's batch_norm_epsilon

# EfficientNet-Lite base stages (= Lite0): (repeats, kernel, stride, expand ratio, in channels, out channels).
LITE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass
class Backbone:
    """A pretrained image model: uint8 images -> pooled features -> ImageNet-1K logits."""

    name: str
    image_size: int
    feature_dim: int
    features_model: keras.Model
    classifier: keras.Model | None
    class_names: list[str] = field(repr=False)
    class_wnids: list[str] = field(repr=False)
    cache_key: str = ""

    @cached_property
    def forward_model(self) -> keras.Model:
        """The whole forward in one Keras model, built once: uint8 images -> [features, logits] (features
        alone without a classifier). features.backbone_forward compiles it (runtime.cached_forward)."""
        if self.classifier is None:
            return self.features_model
        images = keras.Input(self.features_model.input_shape[1:], dtype="uint8", name="images")
        features = self.features_model(images)
        # Named, not numbered: the name is part of the exported program's key (runtime._exported_forward).
        return keras.Model(images, [features, self.classifier(features)], name=f"{self.name}_forward")


# ---------------------------------------------------------------- platform choice

def default_depthwise() -> str:
    """'shifted' on CPU (XLA's grouped convolution is slow there), 'grouped' on accelerators."""
    return "shifted" if platform() == "cpu" else "grouped"


# ---------------------------------------------------------------- layers

@keras.saving.register_keras_serializable(package="devise")
class ImagePreprocess(keras.layers.Layer):
    """uint8 RGB -> float32 normalised: (x - mean) / std per channel, optionally RGB -> BGR first."""

    def __init__(self, mean, std, bgr=False, **kwargs):
        super().__init__(**kwargs)
        self.mean, self.std, self.bgr = tuple(float(m) for m in mean), tuple(float(s) for s in std), bool(bgr)

    def call(self, images):
        x = ops.cast(images, "float32")
        if self.bgr:
            x = ops.flip(x, axis=-1)
        return (x - ops.convert_to_tensor(self.mean)) / ops.convert_to_tensor(self.std)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std, "bgr": self.bgr}


def to_uint8(pixels):
    """Interpolated float pixels back to uint8, rounded (every backbone's input is uint8)."""
    return ops.cast(ops.clip(ops.round(pixels), 0, 255), "uint8")


@keras.saving.register_keras_serializable(package="devise")
class ResizeImages(keras.layers.Layer):
    """uint8 (B, S, S, 3) -> uint8 (B, size, size, 3): bilinear with antialiasing, rounded back to uint8
    (a part of a side-by-side backbone that reads a smaller input than the whole)."""

    def __init__(self, size: int, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})  # never bf16: the pixels are rounded to uint8
        self.size = int(size)

    def call(self, images):
        return to_uint8(ops.image.resize(ops.cast(images, "float32"), (self.size, self.size),
                                         interpolation="bilinear", antialias=True))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "size": self.size}


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (extra pixel at the end), as efficientnet-lite-pytorch's Conv2dStaticSamePadding."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@keras.saving.register_keras_serializable(package="devise")
class ShiftedDepthwiseConv2D(keras.layers.Layer):
    """Depthwise conv ('same' padding) + bias + ReLU6 as k*k shifted multiply-adds.

    Same weights layout and numbers as keras.layers.DepthwiseConv2D (kernel (k, k, C, 1), bias (C,)), but
    XLA on CPU runs it about 6x faster than a grouped convolution (feature_group_count=C): the adds fuse
    into one elementwise loop.
    """

    def __init__(self, kernel_size: int, strides: int = 1, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.kernel_size, self.strides = int(kernel_size), int(strides)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        channels = input_shape[-1]
        self.kernel = self.add_weight(name="kernel", shape=(self.kernel_size, self.kernel_size, channels, 1),
                                      initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(channels,), initializer=self.bias_initializer)

    def call(self, x):
        k, s = self.kernel_size, self.strides
        h, w = x.shape[1], x.shape[2]
        (top, bottom), (left, right) = _same_padding(h, k, s), _same_padding(w, k, s)
        x = ops.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
        out_h, out_w = -(-h // s), -(-w // s)
        out = None
        for i in range(k):
            for j in range(k):
                # Strided slice = the input pixels that kernel tap (i, j) sees for every output pixel.
                window = x[:, i:i + s * (out_h - 1) + 1:s, j:j + s * (out_w - 1) + 1:s, :]
                term = window * self.kernel[i, j, :, 0]
                out = term if out is None else out + term
        return ops.relu6(out + self.bias)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        s = self.strides
        return (b, None if h is None else -(-h // s), None if w is None else -(-w // s), c)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "strides": self.strides,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer)}


# ---------------------------------------------------------------- EfficientNet-Lite

@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite: multipliers and resolution as efficientnet-lite-pytorch's efficientnet_params."""

    name: str
    title: str  # for messages
    width: float
    depth: float
    image_size: int


LITE0 = LiteVariant("efficientnet_lite0", "EfficientNet-Lite0", 1.0, 1.0, 224)
LITE2 = LiteVariant("efficientnet_lite2", "EfficientNet-Lite2", 1.1, 1.2, 260)
LITE_STEM, LITE_HEAD = 32, 1280  # the Lite family keeps stem and head fixed (fix_head_stem), at every width


def _round_filters(channels: int, width: float) -> int:
    """Channels times the width multiplier, to a multiple of 8, never more than 10% down (TF's builder)."""
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def _lite_blocks(variant: LiteVariant) -> list[tuple]:
    """(torch prefix, kernel, stride, expand, in, out) for every MBConv block of a Lite variant.

    Channels scale with the width; repeats scale with the depth (rounded up) except in the first and the
    last stage, which fix_head_stem keeps as they are; the first block reads the fixed 32-channel stem."""
    blocks, last = [], len(LITE_STAGES) - 1
    for stage, (repeats, kernel, stride, expand, cin, cout) in enumerate(LITE_STAGES):
        cin = LITE_STEM if stage == 0 else _round_filters(cin, variant.width)
        cout = _round_filters(cout, variant.width)
        if 0 < stage < last:
            repeats = math.ceil(variant.depth * repeats)
        for r in range(repeats):
            blocks.append((f"_blocks.{len(blocks)}", kernel, stride if r == 0 else 1, expand, cin if r == 0 else cout, cout))
    return blocks


def _lite_shapes(variant: LiteVariant) -> dict[str, tuple]:
    """Every checkpoint tensor the Keras model reads, with the shape the architecture implies."""
    shapes = {}

    def conv_bn(conv, bn, shape):
        shapes[f"{conv}.weight"] = shape
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{stat}"] = (shape[0],)

    conv_bn("_conv_stem", "_bn0", (LITE_STEM, 3, 3, 3))
    blocks = _lite_blocks(variant)
    for prefix, kernel, _, expand, cin, cout in blocks:
        mid = cin * expand
        if expand != 1:
            conv_bn(f"{prefix}._expand_conv", f"{prefix}._bn0", (mid, cin, 1, 1))
        conv_bn(f"{prefix}._depthwise_conv", f"{prefix}._bn1", (mid, 1, kernel, kernel))
        conv_bn(f"{prefix}._project_conv", f"{prefix}._bn2", (cout, mid, 1, 1))
    conv_bn("_conv_head", "_bn1", (LITE_HEAD, blocks[-1][5], 1, 1))
    shapes["_fc.weight"], shapes["_fc.bias"] = (1000, LITE_HEAD), (1000,)
    return shapes


def _lite_state(path: Path, variant: LiteVariant) -> dict:
    """The checkpoint's state dict, checked tensor by tensor against the variant's architecture."""
    state = load_state_dict(path)
    for key, shape in _lite_shapes(variant).items():
        if key not in state:
            raise DeviseError(f"{path}: not an {variant.title} checkpoint (no tensor '{key}')")
        if tuple(state[key].shape) != shape:
            raise DeviseError(f"{path}: not an {variant.title} checkpoint ('{key}' has shape "
                              f"{tuple(state[key].shape)}, expected {shape})")
    return state


def _fold_bn(state: dict, conv: str, bn: str, depthwise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Torch conv weight + its batch norm -> Keras (kernel, bias) with the batch norm folded in."""
    weight = state[f"{conv}.weight"].astype(np.float64)
    scale = state[f"{bn}.weight"] / np.sqrt(state[f"{bn}.running_var"].astype(np.float64) + BN_EPS)
    bias = state[f"{bn}.bias"] - state[f"{bn}.running_mean"] * scale
    if depthwise:  # torch (C, 1, k, k) -> keras (k, k, C, 1)
        kernel = (weight * scale[:, None, None, None]).transpose(2, 3, 0, 1)
    else:  # torch (O, I, k, k) -> keras (k, k, I, O)
        kernel = (weight * scale[:, None, None, None]).transpose(2, 3, 1, 0)
    return kernel.astype(np.float32), bias.astype(np.float32)


class _Given(keras.initializers.Initializer):
    """An 'initializer' that hands back the array the variable holds anyway (from the checkpoint), already
    a backend tensor: Keras' own conversion of a numpy array would compile a program per shape."""

    def __init__(self, value: np.ndarray):
        self.value = value

    def __call__(self, shape, dtype=None):
        if tuple(shape) != self.value.shape:
            raise ValueError(f"weight of shape {tuple(shape)} given an array of shape {self.value.shape}")
        return to_tensor(np.ascontiguousarray(self.value, dtype=dtype))


# The keyword arguments that set a layer's (kernel, bias) initializers, where not these defaults.
_INITIALIZER_ARGS = {keras.layers.DepthwiseConv2D: ("depthwise_initializer", "bias_initializer")}


def _with_weights(layer_cls, weights, x, **kwargs):
    """layer_cls(**kwargs)(x) with its variables created from `weights` (kernel, bias), not random draws.

    The initializers are then reset to the class's defaults: the layer's config (clone_model, saving) is a
    plain layer's and holds no arrays."""
    names = _INITIALIZER_ARGS.get(layer_cls, ("kernel_initializer", "bias_initializer"))
    layer = layer_cls(**kwargs, **{n: _Given(w) for n, w in zip(names, weights, strict=True)})
    y = layer(x)
    defaults_ = inspect.signature(layer_cls.__init__).parameters
    for n in names:
        setattr(layer, n, keras.initializers.get(defaults_[n].default))
    return y


def _conv(x, filters, kernel, stride, weights, name, activation="relu6"):
    return _with_weights(keras.layers.Conv2D, weights, x, filters=filters, kernel_size=kernel, strides=stride,
                         padding="same", activation=activation, name=name)


def _depthwise(x, kernel, stride, weights, name, formulation):
    if formulation == "shifted":
        return _with_weights(ShiftedDepthwiseConv2D, weights, x, kernel_size=kernel, strides=stride, name=name)
    return _with_weights(keras.layers.DepthwiseConv2D, weights, x, kernel_size=kernel, strides=stride,
                         padding="same", activation="relu6", name=name)


def _build_lite(state: dict, variant: LiteVariant, formulation: str) -> tuple[keras.Model, keras.Model]:
    size = variant.image_size
    images = keras.Input((size, size, 3), dtype="uint8", name="images")
    x = ImagePreprocess([m * 255 for m in IMAGENET_MEAN], [s * 255 for s in IMAGENET_STD], name="preprocess")(images)
    x = _conv(x, LITE_STEM, 3, 2, _fold_bn(state, "_conv_stem", "_bn0"), "stem")
    for prefix, kernel, stride, expand, cin, cout in _lite_blocks(variant):
        name = prefix.lstrip("_").replace(".", "_")
        inputs = x
        if expand != 1:
            x = _conv(x, cin * expand, 1, 1, _fold_bn(state, f"{prefix}._expand_conv", f"{prefix}._bn0"), f"{name}_expand")
        x = _depthwise(x, kernel, stride, _fold_bn(state, f"{prefix}._depthwise_conv", f"{prefix}._bn1", True),
                       f"{name}_depthwise", formulation)
        x = _conv(x, cout, 1, 1, _fold_bn(state, f"{prefix}._project_conv", f"{prefix}._bn2"), f"{name}_project", None)
        if stride == 1 and cin == cout:
            x = keras.layers.Add(name=f"{name}_add")([x, inputs])
    x = _conv(x, LITE_HEAD, 1, 1, _fold_bn(state, "_conv_head", "_bn1"), "head")
    features = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if keras.config.dtype_policy().compute_dtype != "float32":  # mixed precision: hand back float32
        features = keras.layers.Activation("linear", dtype="float32", name="features_float32")(features)
    features_model = keras.Model(images, features, name=f"{variant.name}_features")

    pooled = keras.Input((LITE_HEAD,), name="features")
    fc = (state["_fc.weight"].T.astype(np.float32), state["_fc.bias"].astype(np.float32))
    logits = _with_weights(keras.layers.Dense, fc, pooled, units=1000, name="logits", dtype="float32")
    classifier = keras.Model(pooled, logits, name=f"{variant.name}_classifier")
    return features_model, classifier


# ---------------------------------------------------------------- ResNet-50

def _resnet50_weights(weights) -> str:
    """'imagenet' or an existing local weights file; None looks where Keras caches its download."""
    if weights == "imagenet":
        return weights
    if weights is None:
        cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / \
            "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
        if cached.is_file():
            return str(cached)
        raise DeviseError("resnet50 needs weights: pass weights=PATH / --weights PATH (.h5, .weights.h5, .keras) "
                          "or 'imagenet' (downloads, needs internet)")
    path = Path(weights)
    if not path.is_file():
        raise DeviseError(f"{path}: no such weights file for resnet50")
    # Check the file's signature before building the network: a wrong file fails in a millisecond.
    with open(path, "rb") as f:
        head = f.read(8)
    if head != b"\x89HDF\r\n\x1a\n" and not head.startswith(b"PK"):
        raise DeviseError(f"{path}: not a Keras weights file (expected HDF5 .h5 or a .keras archive)")
    return str(path)


def _build_resnet50(weights: str) -> tuple[keras.Model, keras.Model]:
    try:
        if weights == "imagenet":
            base = keras.applications.ResNet50(include_top=True, weights="imagenet")
        elif weights.endswith(".keras"):
            base = keras.saving.load_model(weights, compile=False)
        else:
            base = keras.applications.ResNet50(include_top=True, weights=None)
            base.load_weights(weights)
    except DeviseError:
        raise
    except Exception as exc:  # h5py/keras raise many types for a bad file
        detail = " ".join(str(exc).split())[:200]
        raise DeviseError(f"{weights}: could not load ResNet50 ImageNet weights ({exc.__class__.__name__}: {detail})") from None
    trunk = keras.Model(base.input, base.get_layer("avg_pool").output, name="resnet50_trunk")
    images = keras.Input((224, 224, 3), dtype="uint8", name="images")
    x = ImagePreprocess(CAFFE_BGR_MEAN, (1.0, 1.0, 1.0), bgr=True, name="preprocess")(images)
    features_model = keras.Model(images, trunk(x), name="resnet50_features")
    # Keras' top layer has a softmax; the classifier returns logits, so copy its weights into a linear Dense.
    pooled = keras.Input((2048,), name="features")
    fc = keras.layers.Dense(1000, name="logits")
    classifier = keras.Model(pooled, fc(pooled), name="resnet50_classifier")
    fc.set_weights(base.get_layer("predictions").get_weights())
    return features_model, classifier


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry. weights: None / a path / 'imagenet' -> a checked weights reference (a one-line
    DeviseError if unusable); build: (weights, depthwise formulation) -> (features_model, classifier)."""

    image_size: int
    feature_dim: int
    weights: Callable[[str | None], str | tuple[str, ...]]
    build: Callable[[str | tuple[str, ...], str], tuple[keras.Model, keras.Model]]
    parts: tuple[str, ...] = ()  # a side-by-side backbone: the registered backbones it joins


def _lite_entry(variant: LiteVariant, locator: Callable[[], Path]) -> BackboneSpec:
    def weights(given: str | None) -> str:
        path = str(locator() if given is None else given)
        if not Path(path).is_file():
            raise DeviseError(f"{path}: no such checkpoint file for {variant.name}")
        return path

    def build(weights: str, formulation: str):
        return _build_lite(_lite_state(Path(weights), variant), variant, formulation)

    return BackboneSpec(variant.image_size, LITE_HEAD, weights, build)


def _side_by_side_entry(*parts: str) -> BackboneSpec:
    """Registered backbones as one: every part reads the same image (at the largest part's size, resized
    inside the model for the others), their pooled features are concatenated, and the ImageNet classifier
    is the first part's (on its slice of the features)."""
    specs = [BACKBONES[part] for part in parts]
    size = max(spec.image_size for spec in specs)

    def weights(given: str | None) -> tuple[str, ...]:
        if given is not None:
            raise DeviseError(f"{'_'.join(parts)} joins {' and '.join(parts)} and reads their packaged weights: "
                              "it takes no weights file")
        return tuple(spec.weights(None) for spec in specs)

    def build(weights: tuple[str, ...], formulation: str):
        images = keras.Input((size, size, 3), dtype="uint8", name="images")
        features, classifiers = [], []
        for part, spec, part_weights in zip(parts, specs, weights):
            part_features, classifier = spec.build(part_weights, formulation)
            x = images if spec.image_size == size else ResizeImages(spec.image_size, name=f"{part}_resize")(images)
            features.append(part_features(x))
            classifiers.append(classifier)
        joined = keras.layers.Concatenate(name="features", dtype="float32")(features)
        features_model = keras.Model(images, joined, name="_".join(parts) + "_features")
        pooled = keras.Input((sum(spec.feature_dim for spec in specs),), name="features")
        classifier = keras.Model(pooled, classifiers[0](pooled[:, :specs[0].feature_dim]),
                                 name="_".join(parts) + "_classifier")
        return features_model, classifier

    return BackboneSpec(size, sum(spec.feature_dim for spec in specs), weights, build, parts=tuple(parts))


BACKBONES: dict[str, BackboneSpec] = {
    LITE0.name: _lite_entry(LITE0, efficientnet_lite0_checkpoint),
    LITE2.name: _lite_entry(LITE2, efficientnet_lite2_checkpoint),
    "resnet50": BackboneSpec(224, 2048, _resnet50_weights, lambda weights, formulation: _build_resnet50(weights)),
}
# Lite0 and Lite2 side by side (2560-d, 260 px): the training default; defaults.TRAIN_BACKBONE says why.
BACKBONES["efficientnet_lite0_lite2"] = _side_by_side_entry(LITE0.name, LITE2.name)


def list_backbones() -> list[str]:
    """The names load_backbone and every --backbone option accept."""
    return list(BACKBONES)


# ---------------------------------------------------------------- loading

@lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _weights_id(weights: str | tuple[str, ...]) -> str:
    if isinstance(weights, tuple):  # a side-by-side backbone: its parts' weights
        return "+".join(_weights_id(w) for w in weights)
    if weights == "imagenet":
        return "keras-imagenet"
    stat = os.stat(weights)
    return f"{_file_digest(weights, stat.st_size, stat.st_mtime_ns)}:{stat.st_size}"


@lru_cache(maxsize=4)
def _build(name: str, weights: str, weights_id: str, formulation: str, precision: str = "float32") -> Backbone:
    spec = BACKBONES[name]
    previous = keras.config.dtype_policy()
    # bfloat16: layers built now compute in bf16 with float32 weights (Keras' mixed_bfloat16 policy).
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        features_model, classifier = spec.build(weights, formulation)
    finally:
        keras.config.set_dtype_policy(previous)
    classes = imagenet1k_classes()
    precision_tag = "" if precision == "float32" else f"|{precision}"  # float32 keys stay as before
    key = hashlib.sha256(f"{name}|{weights_id}|{PREPROCESSING_VERSION}{precision_tag}".encode()).hexdigest()[:16]
    return Backbone(name=name, image_size=spec.image_size, feature_dim=spec.feature_dim,
                    features_model=features_model, classifier=classifier, class_names=[c["name"] for c in classes],
                    class_wnids=[c["wnid"] for c in classes], cache_key=f"{name}-{key}")


def load_backbone(name: str = defaults.BACKBONE, weights: str | os.PathLike | None = None,
                  depthwise: str | None = None, precision: str | None = None) -> Backbone:
    """Build (once per process; later calls are cached) a pretrained backbone.

    name: one of list_backbones() ('efficientnet_lite0', 'efficientnet_lite2', 'resnet50'). weights: None
    for the packaged/default weights, a local checkpoint path (.pth/zip for the EfficientNet-Lite models,
    .h5/.keras for resnet50) or 'imagenet' (resnet50, downloads). depthwise: 'shifted' | 'grouped' | None
    (None: shifted on CPU, grouped on GPU/TPU). precision: 'float32' | 'bfloat16' | None (None: mixed
    bfloat16 on a GPU/TPU, float32 on CPU, where bf16 has no fast path). Features and logits come back as
    float32 either way.
    """
    name = name.lower().replace("-", "_")
    spec = BACKBONES.get(name)
    if spec is None:
        raise DeviseError(f"unknown backbone '{name}': choose one of {', '.join(BACKBONES)}")
    if depthwise not in (None, "shifted", "grouped"):
        raise DeviseError(f"depthwise must be 'shifted' or 'grouped', not '{depthwise}'")
    weights = spec.weights(None if weights is None else str(weights))
    if precision not in (None, "float32", "bfloat16"):
        raise DeviseError(f"precision must be 'float32' or 'bfloat16', not '{precision}'")
    formulation = depthwise or default_depthwise()
    if precision is None:
        precision = "float32" if platform() == "cpu" else "bfloat16"
    return _build(name, weights, _weights_id(weights), formulation, precision)


# ---------------------------------------------------------------- fine-tuned weights (devise finetune)

def weighted_layers(model):
    """Every layer with weights, descending into nested models (ResNet-50's trunk), input to output."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from weighted_layers(layer)
        elif layer.weights:
            yield layer


def _load_layer_weights(features_model, path: Path) -> None:
    with np.load(path) as data:
        for layer in weighted_layers(features_model):
            keys = [f"{layer.name}/{i}" for i in range(len(layer.get_weights()))]
            if any(k not in data for k in keys):
                raise DeviseError(f"{path}: no weights for backbone layer '{layer.name}' (a different backbone?)")
            layer.set_weights([data[k] for k in keys])


def fresh_features_model(backbone: Backbone) -> keras.Model:
    """A new features_model with the backbone's weights (load_backbone's models are shared and cached)."""
    copy = keras.models.clone_model(backbone.features_model)
    copy.set_weights(backbone.features_model.get_weights())
    return copy


@lru_cache(maxsize=4)
def _finetuned(name: str, weights_path: str, size: int, mtime_ns: int, digest: str) -> Backbone:
    base = load_backbone(name)
    features_model = fresh_features_model(base)
    _load_layer_weights(features_model, Path(weights_path))
    # No ImageNet classifier: the fine-tuned features no longer match its weights.
    return Backbone(name=name, image_size=base.image_size, feature_dim=base.feature_dim,
                    features_model=features_model, classifier=None, class_names=[], class_wnids=[],
                    cache_key=f"{base.cache_key}-finetuned-{digest[:16]}")


def load_finetuned_backbone(name: str, weights_path: str | os.PathLike) -> Backbone:
    """A backbone with fine-tuned weights (a layer-name -> arrays .npz written by devise finetune);
    its cache_key hashes the file, so cached features never mix with the pretrained backbone's."""
    path = Path(weights_path).resolve()
    if not path.is_file():
        raise DeviseError(f"{path}: the run's fine-tuned backbone weights are missing")
    stat = path.stat()
    return _finetuned(name, str(path), stat.st_size, stat.st_mtime_ns,
                      _file_digest(str(path), stat.st_size, stat.st_mtime_ns))
