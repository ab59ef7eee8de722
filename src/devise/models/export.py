"""Export a DeviseModel to ONNX: images and label texts -> unit vectors with onnxruntime and numpy alone.

    devise export conse --format onnx --out conse-onnx          # Python: devise.load("conse").export(OUT)

writes OUT (built in a temporary folder beside it, checked, then renamed into place: a failed export
leaves nothing behind):
- image.onnx (+ image.onnx.data, its weights): uint8 (B, S, S, 3) images framed as devise frames them
  (manifest "framing"; examples/onnx_predict.py) -> float32 (B, D) unit vectors of the label space. The
  backbone's preprocessing, the head (or ConSE's logits -> top-T mix of class vectors) and the
  normalisation are inside; the batch is dynamic;
- text.onnx (+ .data) and tokenizer.json for the MiniLM label space: int32 input_ids and attention_mask
  (B, L), L <= 512 -> unit vectors; or, for a word-vector space, vectors.npy + words.txt (its unit rows);
- labels.npy (E, D) + labels.txt ("label<TAB>synset" per row): the vocabulary's entries (default: the
  WordNet vocabulary `devise predict` ranks), so a top-k is one matrix product and a stable argsort;
- manifest.json: versions, input size, framing, label space, opset, sizes and the parity figures.

The export checks itself: onnxruntime against the Keras model (the path `devise predict` runs) on 64
real images and 64 label texts: max absolute difference of the unit vectors <= PARITY_MAX_ABS and the
same top-5 entries; otherwise a DeviseError and nothing is written.

The backbone is rebuilt with grouped depthwise convolutions holding the same weights (backbones.py's
"grouped" formulation): ONE Conv node per layer instead of k*k shifted multiply-adds, about a tenth of
the graph and faster in onnxruntime; onnx_features_model then writes ReLU6 as one Clip and the
preprocessing channels-first (onnxruntime fuses the Clip into the Conv and keeps one layout), and a
side-by-side backbone's resize as XLA's own sums (same numbers throughout). The graph is traced from
the Keras models (keras.ops) by jax2onnx, so export needs the JAX backend and the `export` extra (onnx,
onnxruntime, jax2onnx).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from devise.assets import foolbox_data_dir
from devise.storage import atomic_write, atomic_write_json
from devise.errors import DeviseError
from devise.data.images import CROP_FRACTION, POLICY_VERSION, load_images, scan_image_files
from devise.labels.vectors import MINILM_SPEC, sentence_label_text
from devise.labels.vocabulary import load_vocabulary

INSTALL_HINT = "pip install -e '.[export]'"
ONNX_OPSET = 23  # jax2onnx's default; onnxruntime >= 1.20 runs it
PARITY_MAX_ABS = 1e-4  # largest |onnxruntime - Keras| allowed on any unit-vector entry
CHECK_COUNT = 64  # real images and label texts the export is checked on
TOP_K = 5  # the check compares each input's top-5 vocabulary entries
MAX_TEXT_LENGTH = 512  # MiniLM's position table: the text graph's symbolic length is bounded by it
FRAMING = {
    "policy": POLICY_VERSION,
    "photo": f"EXIF-transpose, RGB; short side to round(size / {CROP_FRACTION}) (bicubic), centre crop to size",
    "cut_out": "an image with fully transparent pixels: crop to the box of its visible pixels, composite on "
               "white, pad to a white square, resize to size (bicubic)",
    "crop_fraction": CROP_FRACTION,
    "jpeg_draft": "Image.draft('RGB', (round(size / crop_fraction),) * 2) before decoding, as devise does",
}


def _onnx_modules():
    """onnxruntime and jax2onnx, or a one-line error saying how to install them."""
    try:
        import jax2onnx
        import onnxruntime
    except ImportError as exc:
        raise DeviseError(f"ONNX export needs the export extra ({exc.name} is missing): {INSTALL_HINT}") from None
    import keras

    if keras.backend.backend() != "jax":
        raise DeviseError(f"ONNX export traces the model with JAX: set KERAS_BACKEND=jax "
                          f"(the backend is {keras.backend.backend()})")
    return jax2onnx, onnxruntime


# ---------------------------------------------------------------- the graphs (keras.ops)

def grouped_backbone(model):
    """The model's backbone built with grouped depthwise convolutions: (features_model, classifier or None),
    the features model in its ONNX-friendly form (onnx_features_model). A pretrained backbone is built again
    from its checkpoint; a fine-tuned one (a run's backbone_weights) is a copy whose weights are copied layer
    by layer."""
    from devise.models.backbones import load_backbone, weighted_layers

    grouped = load_backbone(model.backbone_name, depthwise="grouped", precision="float32")
    if not model.settings.get("backbone_weights"):
        return onnx_features_model(grouped.features_model), grouped.classifier
    import keras

    features_model = keras.models.clone_model(grouped.features_model)  # load_backbone's models are shared
    for mine, theirs in zip(weighted_layers(features_model), weighted_layers(model.backbone.features_model),
                            strict=True):
        if mine.name != theirs.name:
            raise DeviseError(f"{model.name}: backbone layer {theirs.name} has no grouped counterpart")
        mine.set_weights(theirs.get_weights())
    return onnx_features_model(features_model), None


def relu6_as_clip(x):
    """ReLU6 as one clip: the same numbers as min(max(x, 0), 6), but jax2onnx writes one Clip node (its
    relu6 is Max + Min), which onnxruntime fuses into the convolution before it."""
    from keras import ops

    return ops.clip(x, 0.0, 6.0)


def fused_multiply_add(a, b, c):
    """a * b + c rounded once, in float32 ops alone (keras.ops; ONNX has no FMA): Dekker's exact product
    p + e = a * b (Veltkamp's split), Knuth's exact sum s + t = p + c, then s + (t + e). Faithful, and
    bit-identical to a hardware FMA on all 9.6M resized pixels of the export check's 64 images."""
    def split(x):  # x = high + low, each half of float32's 24-bit significand (Veltkamp, 2**12 + 1)
        scaled = x * 4097.0
        high = scaled - (scaled - x)
        return high, x - high

    p = a * b
    (a1, a2), (b1, b2) = split(a), split(b)
    e = ((a1 * b1 - p) + a1 * b2 + a2 * b1) + a2 * b2
    s = p + c
    v = s - p
    t = (p - (s - v)) + (c - v)
    return s + (t + e)


def onnx_features_model(features_model):
    """The features model as onnxruntime runs it fast, the same numbers (a copy; the layers it does not
    change are shared, so are their weights):
    - ReLU6 activations as relu6_as_clip (one Clip each, fused into the Conv: no layout change around it);
    - the per-channel preprocessing on channels-first pixels (onnxruntime broadcasts (1, 1, 1, 3) element by
      element, a tenth of the run; (1, 3, 1, 1) is one loop per plane): the same subtraction and division;
    - a side-by-side backbone's ResizeImages as MatrixResize: jax2onnx's resize cannot take a symbolic
      batch, and the pixels are rounded to uint8, so the sums must be XLA's to the last bit. Its (out, in)
      matrix is the resize itself applied to a basis (resize is linear and separable): the same weights."""
    import keras
    from keras import ops

    from devise.models.backbones import ImagePreprocess, ResizeImages, to_uint8

    class MatrixResize(keras.layers.Layer):
        """ResizeImages with XLA-CPU's arithmetic spelled out, so onnxruntime gets the same float pixels
        bit for bit before they are rounded to uint8 (any other order of the sums rounds ~3 pixels in
        100,000 the other way, up to 6e-3 on the features). XLA contracts H first, as one fused
        multiply-add chain over the taps in ascending order (Eigen), then W with two accumulators, even
        and odd input columns, each such a chain, added at the end (XNNPACK): found on x86 with jax 0.10,
        bit for bit; elsewhere XLA may sum otherwise, and the export check says so. ONNX has no fused
        multiply-add: fused_multiply_add computes it in float32 with error-free transformations."""

        def __init__(self, matrix, **kwargs):
            super().__init__(**kwargs)
            matrix = np.asarray(matrix, np.float32)  # (out, in)
            taps, column = matrix != 0, np.arange(matrix.shape[1])
            self.rows = self.slots(matrix, taps)
            self.lanes = [self.slots(matrix, taps & (column % 2 == lane)) for lane in (0, 1)]

        @staticmethod
        def slots(matrix, keep):
            """(index, weight), each (slot, out): output j's kept taps in ascending order; weight 0 past
            its last (a zero weight leaves the sum as it is)."""
            index = np.zeros((int(keep.sum(axis=1).max()), len(matrix)), np.int32)
            weight = np.zeros(index.shape, np.float32)
            for j, row in enumerate(keep):
                columns = np.flatnonzero(row)
                index[:len(columns), j], weight[:len(columns), j] = columns, matrix[j, columns]
            return index, weight

        @staticmethod
        def chain(x, axis, slots):
            shape = [1, 1, 1, 1]
            shape[axis] = slots[0].shape[1]
            acc = None
            for index, w in zip(*slots):
                tap, w = ops.take(x, index, axis=axis), w.reshape(shape)
                acc = tap * w if acc is None else fused_multiply_add(tap, w, acc)
            return acc

        def call(self, images):
            rows = self.chain(ops.cast(images, "float32"), 1, self.rows)
            even, odd = (self.chain(rows, 2, lane) for lane in self.lanes)
            return to_uint8(even + odd)

    class ChannelsFirstPreprocess(ImagePreprocess):
        def call(self, images):
            x = ops.transpose(ops.cast(images, "float32"), (0, 3, 1, 2))
            if self.bgr:
                x = ops.flip(x, axis=1)
            mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in (self.mean, self.std))
            return ops.transpose((x - mean) / std, (0, 2, 3, 1))

    def swap(layer):
        if isinstance(layer, ResizeImages):
            size = int(features_model.input_shape[1])
            basis = np.eye(size, dtype=np.float32).reshape(1, size, 1, size)  # one column: copied across W
            resized = ops.image.resize(basis, (layer.size, layer.size), interpolation="bilinear", antialias=True)
            return MatrixResize(np.asarray(resized)[0, :, 0, :], name=layer.name)
        if type(layer) is ImagePreprocess:
            return ChannelsFirstPreprocess(layer.mean, layer.std, layer.bgr, name=layer.name)
        if getattr(layer, "activation", None) is keras.activations.relu6:
            config = {**layer.get_config(), "activation": relu6_as_clip}
            config.update({key: "zeros" for key in config if key.endswith("_initializer")})  # weights copied below
            clipped = type(layer).from_config(config)
            clipped.build(layer.input.shape)
            clipped.set_weights(layer.get_weights())
            return clipped
        return layer

    return keras.models.clone_model(features_model, clone_function=swap, recursive=True)


def conse_mix(probabilities, class_vectors: np.ndarray, T: int):
    """devise.models.conse.conse_embed in keras.ops: the top-T probabilities (renormalised) mix the unit class
    vectors, as one masked matrix product (no gather: a small ONNX graph)."""
    from keras import ops

    T = min(int(T), int(class_vectors.shape[0]))
    unit = class_vectors / np.maximum(np.linalg.norm(class_vectors, axis=1, keepdims=True), 1e-12)
    threshold = ops.top_k(probabilities, T)[0][:, -1:]
    weights = ops.where(probabilities >= threshold, probabilities, 0.0)
    weights = weights / ops.maximum(ops.sum(weights, axis=1, keepdims=True), 1e-12)
    return ops.matmul(weights, unit.astype(np.float32))


def _unit(x):
    from keras import ops

    # unit_rows' rule: an all-zero row stays zero
    norm = ops.norm(x, axis=-1, keepdims=True)
    return x / ops.where(norm > 0, norm, 1.0)


def image_forward(model, features_model, classifier):
    """uint8 (B, S, S, 3) -> unit (B, D): the whole path of DeviseModel.encode_images in keras.ops, on the
    given backbone models (grouped_backbone)."""
    from keras import ops

    head = model.model

    def forward(images):
        features = features_model(images, training=False)
        if model.method in ("devise", "random"):
            return _unit(head(features, training=False))
        if head is None:  # ConSE over the backbone's ImageNet classifier
            probabilities = ops.softmax(classifier(features, training=False), axis=-1)
            probabilities = ops.take(probabilities, np.asarray(model.class_columns, np.int32), axis=1)
        else:
            probabilities = head(features, training=False)
        return _unit(conse_mix(probabilities, np.asarray(model.label_vectors, np.float32), model.T))

    return forward


def text_forward(text_encoder):
    """int32 input_ids, attention_mask (B, L) -> unit (B, 384): the MiniLM Keras model (token types 0)."""
    from keras import ops

    bert = text_encoder.model

    def forward(input_ids, attention_mask):
        return bert(ops.stack([input_ids, ops.zeros_like(input_ids), attention_mask], axis=1))

    return forward


def write_onnx(forward, inputs, input_names, path: Path, opset: int = ONNX_OPSET) -> None:
    """The traced graph as PATH with its weights in PATH.data beside it. Saved here rather than by
    jax2onnx's file mode: onnx refuses when a file of the sidecar's name exists in the working directory."""
    jax2onnx, _ = _onnx_modules()
    import onnx
    from onnx.external_data_helper import set_external_data

    proto = jax2onnx.to_onnx(forward, inputs=inputs, input_names=list(input_names), output_names=["vectors"],
                             opset=opset, return_mode="proto")
    for tensor in proto.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
            set_external_data(tensor, path.name + ".data")
    onnx.save_model(proto, str(path))


# ---------------------------------------------------------------- what the export is checked on

def default_check_images(count: int = CHECK_COUNT) -> list[str]:
    """Real images to check an export on: foolbox's photos (dev install) and the emoji benchmark's images
    in the data home (devise setup-assets), evenly spread, `count` in all."""
    from devise.data.emoji import emoji_dir

    try:
        photos = sorted(str(p) for p in foolbox_data_dir().glob("imagenet_*.jpg"))
    except DeviseError:
        photos = []
    folder = emoji_dir() / "images"
    emoji = scan_image_files([folder])[0] if folder.is_dir() else []
    need = count - len(photos[:count])
    picked = photos[:count] + [emoji[i] for i in np.linspace(0, len(emoji) - 1, need).round().astype(int)] \
        if len(emoji) >= need else []
    if len(picked) < count:
        raise DeviseError(f"checking the export needs {count} real images: run 'devise setup-assets' (the emoji "
                          f"benchmark) or pass check_images / --check-images FOLDER")
    return picked


def default_check_texts(vocabulary, count: int = CHECK_COUNT) -> list[str]:
    """The label-rule texts of `count` vocabulary entries spread over it (what encode_labels embeds)."""
    rows = np.unique(np.linspace(0, len(vocabulary.labels) - 1, count).round().astype(int))
    return [sentence_label_text(vocabulary.labels[i], synset=vocabulary.synsets[i]) for i in rows]


def top_entries(vectors: np.ndarray, labels: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """(N, k) best rows of `labels` per vector, ties to the lower row (as examples/onnx_predict.py ranks)."""
    return np.argsort(-(vectors @ labels.T), axis=1, kind="stable")[:, :k]


def parity(reference: np.ndarray, exported: np.ndarray, labels: np.ndarray, what: str, bound: float) -> dict:
    """Max abs difference and top-k agreement of two (N, D) unit-vector sets; DeviseError past the bounds."""
    max_abs = float(np.abs(reference - exported).max())
    same = int((top_entries(reference, labels) == top_entries(exported, labels)).all(axis=1).sum())
    figures = {"count": len(reference), "max_abs": max_abs, f"same_top{TOP_K}": same, "bound": bound}
    if not max_abs <= bound or same != len(reference):
        hint = " (the top-5 agree: max_abs= / --max-abs accepts a larger difference)" if same == len(reference) else ""
        raise DeviseError(f"ONNX export failed its check on {what}: max abs difference {max_abs:.2e} (bound "
                          f"{bound:g}), same top-{TOP_K} on {same}/{len(reference)}; nothing written{hint}")
    return figures


def onnx_session(path: Path, threads: int | None = None, spinning: bool = False):
    """An onnxruntime CPU session (threads: intra-op threads; None: onnxruntime's default). spinning: let
    idle intra-op threads busy-wait (onnxruntime's default): on a machine whose cores are shared with
    other work that makes a run wait for descheduled spinners (2-4x slower on the 2 shared cores here)."""
    _, ort = _onnx_modules()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def tokenize(tokenizer_path: Path, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """text.onnx's inputs for texts, as a user of tokenizer.json builds them (padded to the longest)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(texts)
    return {"input_ids": np.asarray([e.ids for e in encoded], np.int32),
            "attention_mask": np.asarray([e.attention_mask for e in encoded], np.int32)}


# ---------------------------------------------------------------- the export

def _versions() -> dict:
    out = {}
    for package in ("devise", "keras", "jax", "jax2onnx", "onnx", "onnxruntime", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def _keras_weight_bytes(model) -> int:
    """Bytes of the Keras weights the image graph holds (backbone, head or classifier, ConSE vectors)."""
    models = [model.backbone.features_model, model.model if model.model is not None else model.backbone.classifier]
    total = sum(int(np.prod(w.shape)) * 4 for m in models if m is not None for w in m.weights)
    return total + (0 if model.method in ("devise", "random") else int(np.asarray(model.label_vectors).nbytes))


def save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    atomic_write(path, write)


def _export_text(model, folder: Path, labels: np.ndarray, vocabulary, texts, manifest: dict, bound: float) -> None:
    """text.onnx + tokenizer.json (MiniLM), checked; or the word vectors (vectors.npy + words.txt)."""
    import jax

    encoder = model.label_encoder
    if model.vectors_spec != MINILM_SPEC:
        save_npy(folder / "vectors.npy", np.asarray(encoder.matrix, np.float32))
        atomic_write(folder / "words.txt", lambda tmp: Path(tmp).write_text("\n".join(encoder.words) + "\n"))
        manifest["text"] = {"kind": "word vectors", "files": ["vectors.npy", "words.txt"], "dim": encoder.dim}
        return
    text_encoder = encoder.encoder
    shutil.copyfile(text_encoder.folder / "tokenizer.json", folder / "tokenizer.json")
    batch, length = jax.export.symbolic_shape("B, L", constraints=(f"L <= {MAX_TEXT_LENGTH}",))
    spec = jax.ShapeDtypeStruct((batch, length), np.int32)
    write_onnx(text_forward(text_encoder), [spec, spec], ["input_ids", "attention_mask"], folder / "text.onnx")
    max_length = text_encoder.config.max_seq_length
    texts = list(texts) if texts is not None else default_check_texts(vocabulary)
    exported = onnx_session(folder / "text.onnx").run(None, tokenize(folder / "tokenizer.json", texts, max_length))[0]
    manifest["text"] = {"kind": "minilm", "files": ["text.onnx", "text.onnx.data", "tokenizer.json"],
                        "inputs": {"input_ids": "int32 (B, L)", "attention_mask": "int32 (B, L)"},
                        "max_length": max_length, "label_text": "a label is its own text; a WordNet synset "
                        "(or a label linked to one) is 'name, a kind of <first hypernym's first lemma>'"}
    manifest["parity"]["texts"] = parity(text_encoder.encode(texts), exported, labels, "texts", bound)


def export_onnx(model, out_dir, vocab: str = "wordnet", check_images=None, check_texts=None,
                overwrite: bool = False, max_abs: float | None = None) -> Path:
    """Write `model` (a DeviseModel) as ONNX files into out_dir (see the module docstring); returns it.

    vocab: the vocabulary labels.npy holds ("wordnet", "imagenet1k" or a label FILE); check_images: image
    files (or folders) to check on (default: default_check_images); check_texts: texts (default: 64
    of the vocabulary's label texts). overwrite: replace an existing out_dir (else an error). max_abs: the
    check's bound (default PARITY_MAX_ABS; a larger one accepts a model whose sums onnxruntime orders
    otherwise, e.g. on a CPU where XLA resizes a side-by-side backbone's input in another order)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise DeviseError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    _onnx_modules()
    import jax

    model.check_open_vocabulary()
    bound = PARITY_MAX_ABS if max_abs is None else float(max_abs)
    start = time.perf_counter()
    vocabulary = load_vocabulary(vocab, model.vectors_spec)
    labels = np.ascontiguousarray(vocabulary.matrix[vocabulary.entry_term], np.float32)  # one row per entry
    images_paths = scan_image_files(check_images)[0] if check_images is not None else default_check_images()
    size = model.backbone.image_size
    images, valid = load_images(images_paths[:CHECK_COUNT], size)
    images = images[valid]
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        forward = image_forward(model, *grouped_backbone(model))
        write_onnx(forward, [jax.ShapeDtypeStruct(("B", size, size, 3), np.uint8)], ["images"], folder / "image.onnx")
        exported = onnx_session(folder / "image.onnx").run(None, {"images": images})[0]
        manifest = {
            "format": "onnx", "opset": ONNX_OPSET, "versions": _versions(), "model": model.name,
            "method": model.method, "backbone": model.backbone_name, "T": model.T if model.method != "devise" else None,
            "image": {"file": "image.onnx", "input": f"uint8 (B, {size}, {size}, 3) RGB", "size": size,
                      "output": f"float32 (B, {vocabulary.matrix.shape[1]}) unit vectors"},
            "framing": FRAMING,
            "label_space": {"vectors": model.vectors_spec, "dim": int(vocabulary.matrix.shape[1])},
            "labels": {"vocab": vocabulary.name, "count": len(vocabulary.labels), "files": ["labels.npy", "labels.txt"],
                       "rank": "scores = vectors @ labels.T; stable argsort, best first"},
            "parity": {"images": parity(model.encode_images(images), exported, labels, "images", bound)},
        }
        _export_text(model, folder, labels, vocabulary, check_texts, manifest, bound)
        save_npy(folder / "labels.npy", labels)
        lines = [f"{label}\t{synset or ''}" for label, synset in zip(vocabulary.labels, vocabulary.synsets)]
        atomic_write(folder / "labels.txt", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
        onnx_bytes = sum(f.stat().st_size for f in folder.glob("image.onnx*"))
        keras_bytes = _keras_weight_bytes(model)
        manifest["sizes"] = {"image_onnx_bytes": onnx_bytes, "keras_weights_bytes": keras_bytes,
                             "ratio": round(onnx_bytes / keras_bytes, 4)}
        manifest["export_seconds"] = round(time.perf_counter() - start, 1)
        atomic_write_json(folder / "manifest.json", manifest, indent=2)
        _move_into_place(folder, out)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return out


def _move_into_place(folder: Path, out: Path) -> None:
    """Rename the finished folder to `out` (an old one is moved aside first and removed after), its
    files readable as the umask allows (temporary files are created private)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)
    folder.chmod(0o777 & ~umask)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old) if out.is_dir() else out.rename(old)
    os.replace(folder, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


# format -> exporter(model, out_dir, **options): what DeviseModel.export and `devise export --format` take.
EXPORT_FORMATS = {"onnx": export_onnx}
