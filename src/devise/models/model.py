"""DeviseModel: images -> unit vectors in a label space, with the label encoder of that space.

    model = devise.load("conse")                        # a preset (devise.list_presets()) or a run folder
    images = model.encode_images(["chelsea.jpg"])       # (N, D) unit rows
    labels = model.encode_labels(["cat", "dog", "cup"])  # (L, D) unit rows, by the label-text rule
    scores = images @ labels.T                          # scoring is a matrix product, outside the model
    model.predict(["chelsea.jpg"], top=5)               # ranked labels of the WordNet vocabulary

One object for every way an image becomes a vector (settings["method"]):
- "devise", "random": a head (linear or MLP keras.Model) maps backbone features into the label space;
- "conse": class probabilities mixed over the top-T classes' vectors (Norouzi et al. 2014), from the
  backbone's own ImageNet-1K classifier (no head: the "conse" preset) or a trained softmax head;
- "softmax": a trained classifier over its training classes; it embeds by ConSE when it has their vectors.
A run folder written by `devise train` (or `save`) loads through `load`, like a preset.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from devise import defaults
from devise.assets import imagenet1k_classes
from devise.storage import atomic_save_npz, atomic_write_json, check_manifest, write_errors, write_manifest
from devise.evaluation.confidence import UNKNOWN, Confidence, answer, rank_with_probabilities, resolve_threshold
from devise.models.conse import cached_imagenet1k_class_vectors, conse_embed, conse_from_logits
from devise.errors import DeviseError
from devise.data.features import backbone_forward, extract_features
from devise.data.images import describe, frame_array, load_image
from devise.data.pipeline import bucket as _bucket
from devise.data.pipeline import choose_decoder, decode_chunks, forward_chunks, padded_batches
from devise.models.presets import CONSE_CONFIDENCE, DEFAULT_MODEL, PRESETS
from devise.runtime import default_batch_size, pad_batch, predict_in_batches
from devise.labels.vectors import GLOVE_SPEC, embed_labels, label_list, load_vectors, quiet_dropped_labels, unit_rows
from devise.labels.vocabulary import Vocabulary, load_vocabulary

LOAD_CHUNK = 256  # images decoded per chunk (bounds memory on big folders)
BATCH_SIZE = 32  # images per backbone forward


def random_label_vectors(names, dim: int, seed: int = 0) -> np.ndarray:
    """The random control's vectors: one seeded random unit vector per label NAME, (L, dim) float32.

    A label gets the same vector wherever it appears (training, validation, test) for a given seed.
    """
    rows = []
    for name in names:
        digest = int.from_bytes(hashlib.sha256(str(name).encode("utf-8")).digest()[:8], "little")
        vector = np.random.default_rng([int(seed), digest]).standard_normal(dim)
        rows.append(vector / np.linalg.norm(vector))
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), dim)


def save_keras_model(model, path: Path) -> None:
    """model.keras written atomically (Keras wants the .keras suffix, so write in a temp folder); an OSError
    (a full disk) is one line naming `path`, and the partial file goes with its temp folder."""
    with write_errors(path), tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-model-") as tmp:
        tmp_path = Path(tmp) / "model.keras"
        model.save(tmp_path)
        os.replace(tmp_path, path)


RUN_FILES = ("model.keras", "labels.npz", "settings.json", "history.json")  # what a run manifest covers


def write_run_manifest(folder, settings: dict) -> None:
    """manifest.json of a finished run folder: size and SHA-256 of its files (and of its fine-tuned backbone
    weights), checked by load_model_folder, so a damaged or swapped-in file is named instead of loaded."""
    folder = Path(folder)
    names = [n for n in (*RUN_FILES, settings.get("backbone_weights")) if n and (folder / n).is_file()]
    write_manifest(folder, names)


def _load_keras_model(path: Path):
    """keras.saving.load_model, its many failures (a truncated zip says "File not found") as one line."""
    import keras

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises ValueError, OSError, zipfile and h5py errors alike
        first = (str(exc).strip().splitlines() or [""])[0]
        raise DeviseError(f"{path}: not a loadable Keras model ({type(exc).__name__}: {first})") from None


@dataclass(eq=False)
class DeviseModel:
    """A backbone, a head (or ConSE) and a label encoder: images and labels -> unit vectors of one space.

    Fields are those of a run folder: `model` is the trained head (None for ConSE over the backbone's
    ImageNet classifier), `label_vectors` the unit vectors of `class_names` (the training labels, or the
    ImageNet classes ConSE mixes), `settings` the recorded options (method, backbone, vectors, T, ...).
    """

    method: str
    model: object | None
    class_names: list[str]
    label_vectors: np.ndarray | None
    settings: dict
    history: dict = field(default_factory=dict)
    path: Path | None = None
    class_columns: np.ndarray | None = None  # ImageNet ConSE: the classifier outputs that have a vector
    name: str = ""
    _backbone: object = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ------------------------------------------------------------ what it is made of

    @property
    def T(self) -> int:
        return int(self.settings.get("T", 10))

    @property
    def vectors_spec(self) -> str:
        # Runs from before the MiniLM default recorded no spec: they were trained on GloVe.
        return str(self.settings.get("vectors") or GLOVE_SPEC)

    @property
    def label_encoder(self):
        """The label space's encoder: a SentenceEncoder or WordVectors (devise.labels.vectors.load_vectors)."""
        return load_vectors(self.vectors_spec)

    @property
    def dim(self) -> int:
        if self.label_vectors is not None:
            return int(self.label_vectors.shape[1])
        return int(self.settings.get("vector_dim") or self.label_encoder.dim)

    @property
    def backbone_name(self) -> str:
        """The registered backbone the run was trained on (runs that record none were trained on Lite0)."""
        return self.settings.get("backbone") or defaults.BACKBONE

    @property
    def backbone(self):
        """The Backbone images go through: the run's fine-tuned one (settings["backbone_weights"]) or the
        pretrained one it names; loaded on first use (training and evaluation on cached features never do)."""
        if self._backbone is None:
            from devise.models.backbones import load_backbone, load_finetuned_backbone

            weights = self.settings.get("backbone_weights")
            self._backbone = load_finetuned_backbone(self.backbone_name, Path(self.path or ".") / weights) if weights \
                else load_backbone(self.backbone_name)
        return self._backbone

    def check_open_vocabulary(self) -> None:
        """Refuse to name or search images where the scores would mean nothing."""
        if self.method == "random":
            # The control maps images onto random label vectors: against real word vectors its
            # scores mean nothing, so refuse rather than print confident nonsense.
            raise DeviseError(f"{self.name}: a random-embedding control run cannot name or search images "
                              "(it exists to show the benchmark's word vectors carry the knowledge)")
        if self.method == "softmax" and self.label_vectors is None:
            raise DeviseError(f"{self.name}: this softmax run was trained without label vectors: "
                              "it cannot embed images")

    # ------------------------------------------------------------ features -> the label space

    def _head(self, features) -> np.ndarray:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.settings["feature_dim"]:
            raise DeviseError(f"features of shape {features.shape} do not match this run's "
                              f"feature dimension {self.settings['feature_dim']}")
        with self._lock:  # one compiled forward shared by threads (the web server)
            return np.asarray(predict_in_batches(self.model, features), dtype=np.float32)

    def predict_proba(self, features) -> np.ndarray:
        """(N, C) probabilities over the training classes (softmax and conse runs)."""
        if self.method not in ("softmax", "conse") or self.model is None:
            raise DeviseError(f"a {self.method} model has no class probabilities of its own; use predict_scores")
        return self._head(features)

    def encode_features(self, features, logits=None) -> np.ndarray:
        """Backbone features (N, F) (and ImageNet logits (N, 1000), which ConSE over the backbone's own
        classifier reads) -> (N, D) unit vectors in the label space. Cheap on cached features."""
        if self.method in ("devise", "random"):
            return unit_rows(self._head(features))
        if self.label_vectors is None:
            raise DeviseError("this softmax run was trained without label vectors: it cannot embed images")
        if self.model is None:  # ConSE over the backbone's ImageNet-1K classifier
            if logits is None:
                raise DeviseError("ConSE over the ImageNet classifier needs the backbone's logits")
            return conse_from_logits(logits, self.label_vectors, self.class_columns, self.T)
        return conse_embed(self._head(features), self.label_vectors, self.T)

    embed = encode_features  # the name train/evaluate used for a run

    # ------------------------------------------------------------ images -> the label space

    def encode_images(self, images, progress: bool = False) -> np.ndarray:
        """Images -> (N, D) unit vectors. Takes a path or a list of paths, a uint8 batch (N, S, S, 3), uint8
        (H, W, 3) arrays of any size and PIL images (framed like files: images.frame_array), or a list of
        these. A file that cannot be read is an error naming it (encode_paths keeps going instead);
        anything else is a one-line TypeError."""
        size = self.backbone.image_size
        if isinstance(images, np.ndarray) and images.ndim == 4:
            if images.dtype == np.uint8 and images.shape[1:] == (size, size, 3):
                return self._encode_arrays(images)
            if images.dtype != np.uint8:
                raise TypeError(f"images must be uint8; got {describe(images)}")
        elif isinstance(images, (str, os.PathLike, np.ndarray, Image.Image)):
            images = [images]
        elif isinstance(images, (bytes, dict)) or not isinstance(images, Iterable):
            raise TypeError(f"images must be paths, uint8 arrays or PIL images; got {describe(images)}")
        images = list(images)
        if not all(isinstance(x, (str, os.PathLike)) for x in images):
            arrays = np.zeros((len(images), size, size, 3), np.uint8)
            for i, x in enumerate(images):
                try:
                    arrays[i] = load_image(x, size) if isinstance(x, (str, os.PathLike)) else frame_array(x, size)
                except TypeError as exc:
                    raise TypeError(f"images[{i}]: {exc}") from None
            return self._encode_arrays(arrays)
        paths = images
        embeddings, valid = self.encode_paths(paths, progress=progress)
        if not valid.all():
            raise DeviseError("could not read: " + ", ".join(str(p) for p, ok in zip(paths, valid) if not ok))
        return embeddings

    def _encode_arrays(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> unit (N, D), in padded power-of-two batches (never one image at a time)."""
        images = np.asarray(images)
        size = self.backbone.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
            raise DeviseError(f"images must be uint8 (N, {size}, {size}, 3) arrays for {self.backbone.name}, "
                              f"got {images.dtype} {images.shape}")
        forward = backbone_forward(self.backbone)
        out = []
        for start in range(0, len(images), BATCH_SIZE):
            m = min(BATCH_SIZE, len(images) - start)
            chunk = pad_batch(images[start:start + BATCH_SIZE], _bucket(m, BATCH_SIZE))
            # One forward at a time: concurrent requests (the web server) share one model, and only the
            # JAX path is re-entrant; on a CPU a batch already uses every core.
            with self._lock:
                features, logits = forward(chunk)
                features = np.asarray(features)[:m]
                logits = np.asarray(logits)[:m] if logits is not None else None
            out.append(self.encode_features(features, logits))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_paths(self, paths, progress: bool = False, cache: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Image files -> (unit (N, D), valid (N,) bool). Unreadable files get zero rows, valid False, and
        one warning listing them. cache=True takes backbone features from the on-disk feature cache
        (devise.data.features: computed once, resumable), for collections that are embedded again (indexes)."""

        paths = [str(p) for p in paths]
        if cache and paths:
            fs = extract_features(paths, self.backbone, progress=progress)
            rows = [self.encode_features(np.asarray(fs.features[i:i + 4096], np.float32),
                                         None if fs.logits is None else np.asarray(fs.logits[i:i + 4096], np.float32))
                    for i in range(0, len(paths), 4096)]
            embeddings, valid = np.concatenate(rows), np.asarray(fs.valid, bool)
            embeddings[~valid] = 0.0
            return embeddings, valid
        return self._encode_files(paths, progress)

    def _encode_files(self, paths: list[str], progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """encode_paths without the cache: through devise.data.pipeline, as `devise features` (decode, forward
        and the head overlap); the backbone forward under the model's lock (shared with the web server)."""
        if not paths:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, bool)
        backbone = self.backbone
        forward = backbone_forward(backbone)
        batch_size = default_batch_size()
        embeddings = np.zeros((len(paths), self.dim), np.float32)
        valid = np.zeros(len(paths), bool)
        bad: list[str] = []
        decoder = choose_decoder("auto", say=progress)

        def chunks():
            for _, lo, hi, rows, ok, errors in decode_chunks(paths, backbone.image_size, LOAD_CHUNK, decoder):
                valid[lo:hi] = ok
                bad.extend(errors)
                yield None, padded_batches(lo, rows, batch_size, small_last=True)

        def locked_forward(batch):
            with self._lock:  # dispatch only: the outputs are read back in the writer thread
                return forward(batch)

        def write(start, features, logits):
            embeddings[start:start + len(features)] = self.encode_features(features, logits)
            bar.update(len(features))

        with tqdm(total=len(paths), desc=f"embedding ({self.name})", unit="img", disable=not progress) as bar:
            try:
                forward_chunks(chunks(), locked_forward, write)
            finally:
                decoder.close()
        embeddings[~valid] = 0.0
        if bad:
            warnings.warn(f"skipped {len(bad)} unreadable image(s): " + "; ".join(bad), stacklevel=3)
        return embeddings, valid

    # ------------------------------------------------------------ labels -> the label space

    def encode_labels(self, labels, synsets=None, drop_missing: bool = False) -> np.ndarray:
        """Labels (words, phrases or WordNet ids; synsets: the WordNet id each is linked to) -> (L, D)
        unit vectors by the label-text rule (devise.labels.vectors). The random control's are seeded by name."""
        labels = label_list(labels)
        if self.method == "random":
            return random_label_vectors(labels, self.dim, self.settings["seed"])
        return embed_labels(labels, self.label_encoder, synsets=synsets, drop_missing=drop_missing).matrix

    def vectors_for(self, label_vectors, names=None) -> np.ndarray:
        """The vectors this model scores labels with: the given ones, or the random control's (by name)."""
        if self.method == "random":
            if names is None:
                raise DeviseError("a random-control run scores labels by name: pass the label names")
            return random_label_vectors(names, self.label_vectors.shape[1], self.settings["seed"])
        label_vectors = np.asarray(label_vectors, dtype=np.float32)
        if self.label_vectors is not None and label_vectors.shape[-1] != self.label_vectors.shape[1]:
            raise DeviseError(f"label vectors have dimension {label_vectors.shape[-1]}, this run was trained "
                              f"with {self.label_vectors.shape[1]} (vectors {self.settings.get('vectors')})")
        return unit_rows(label_vectors)

    def predict_scores(self, features, label_vectors, names=None, logits=None) -> np.ndarray:
        """(N, L) cosine scores of every image (as features, and logits for ImageNet ConSE) against any
        label set (zero-shot). names: required by the random control, whose vectors are seeded by name."""
        return self.encode_features(features, logits) @ self.vectors_for(label_vectors, names).T

    # ------------------------------------------------------------ naming images

    @property
    def confidence(self) -> Confidence:
        """Temperature and default "unknown" threshold (devise.evaluation.confidence), fit on the run's validation
        data (a preset's on the benchmark's validation split); defaults for runs that recorded none."""
        return Confidence.from_dict(self.settings.get("confidence"))

    def predict(self, images, labels=None, top: int = 5, vocab: str = "wordnet",
                min_confidence: float | None = None) -> list[list[dict]]:
        """Per image its `top` labels [{"label", "synset", "score", "probability"}], best first: among
        `labels` (any words or phrases) or, when None, the vocabulary `vocab` ("wordnet", "imagenet1k" or
        a file). score: the cosine; probability: calibrated, among the vocabulary (devise.evaluation.confidence).
        When the top label's probability is below min_confidence (default: the model's threshold; none
        above confidence.THRESHOLD_MAX_LABELS labels, e.g. WordNet's), the list starts with {"label": "unknown", ...} and the nearest labels follow."""
        self.check_open_vocabulary()
        resolve_threshold(self, min_confidence)  # a bad value fails before any work
        if labels is None:
            vocabulary = load_vocabulary(vocab, self.vectors_spec)
        else:
            vocabulary = Vocabulary.of_labels(label_list(labels), self.encode_labels(labels))
        threshold = resolve_threshold(self, min_confidence, len(vocabulary.matrix))
        ranked = rank_with_probabilities(self, self.encode_images(images), vocabulary, top)
        unknown = {"label": UNKNOWN, "synset": None, "score": None, "probability": None}
        return [[unknown, *preds] if answer(preds, threshold) == UNKNOWN else preds for preds in ranked]

    # ------------------------------------------------------------ export

    def export(self, out_dir, format: str = "onnx", **options) -> Path:
        """Write this model for use without devise (format "onnx": devise.models.export.export_onnx, the
        `export` extra; options: vocab, check_images, check_texts, overwrite)."""
        from devise.models.export import EXPORT_FORMATS  # onnx and jax2onnx load only here

        if format not in EXPORT_FORMATS:
            raise DeviseError(f"unknown export format '{format}': choose one of {', '.join(EXPORT_FORMATS)}")
        return EXPORT_FORMATS[format](self, out_dir, **options)

    # ------------------------------------------------------------ saving

    def save(self, folder) -> Path:
        """Write a model folder that `load` reads back (a run folder: model.keras when there is a head,
        labels.npz, settings.json, history.json); an existing folder is replaced file by file."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.model is not None:
            save_keras_model(self.model, folder / "model.keras")
        extra = {} if self.class_columns is None else {"class_columns": np.asarray(self.class_columns, np.int64)}
        vectors = np.zeros((0,), np.float32) if self.label_vectors is None else self.label_vectors
        atomic_save_npz(folder / "labels.npz", class_names=np.array(self.class_names, dtype=str),
                        label_vectors=vectors, **extra)
        atomic_write_json(folder / "history.json", self.history, indent=2, sort_keys=True)
        atomic_write_json(folder / "settings.json", self.settings, indent=2, sort_keys=True)  # last: the marker
        write_run_manifest(folder, self.settings)
        return folder


# ---------------------------------------------------------------- loading

def conse_model(backbone: str = defaults.BACKBONE, vectors: str = defaults.VECTORS, T: int = 10,
                name: str = "conse") -> DeviseModel:
    """ConSE over the backbone's ImageNet-1K classifier, in the label space of `vectors` (no training)."""
    with quiet_dropped_labels():  # the few ImageNet names without a word vector are expected, not news
        kept, class_vectors = cached_imagenet1k_class_vectors(str(vectors))
    names = [imagenet1k_classes()[i]["name"] for i in kept]
    settings = {"method": "conse", "backbone": backbone, "vectors": str(vectors), "T": int(T), "imagenet": True,
                "vector_dim": int(class_vectors.shape[1])}
    if str(vectors) in CONSE_CONFIDENCE:
        settings["confidence"] = dict(CONSE_CONFIDENCE[str(vectors)])
    return DeviseModel("conse", None, names, class_vectors, settings, class_columns=kept, name=name)


def load_model_folder(folder) -> DeviseModel:
    """A run folder written by devise train / DeviseModel.save (in any process). Its files are checked against
    its manifest.json (size, SHA-256) first: a damaged or swapped file is named in one line. Runs saved before
    manifests existed load as before."""
    import devise.training.losses  # noqa: F401  (registers the custom losses a saved model names)

    folder = Path(folder)
    settings_path = folder / "settings.json"
    if not settings_path.is_file() or not (folder / "labels.npz").is_file():
        missing = [n for n in ("settings.json", "labels.npz") if not (folder / n).is_file()]
        raise DeviseError(f"{folder}: not a finished training run (missing {', '.join(missing)})")
    try:
        settings = json.loads(settings_path.read_text())
    except (OSError, ValueError) as exc:
        raise DeviseError(f"{settings_path}: not a readable settings file ({exc})") from None
    has_head = not settings.get("imagenet")
    if has_head and not (folder / "model.keras").is_file():
        raise DeviseError(f"{folder}: not a finished training run (missing model.keras)")
    check_manifest(folder)
    try:
        with np.load(folder / "labels.npz", allow_pickle=False) as data:
            class_names = [str(n) for n in data["class_names"]]
            label_vectors = data["label_vectors"] if data["label_vectors"].size else None
            columns = data["class_columns"] if "class_columns" in data else None
        history_path = folder / "history.json"
        history = json.loads(history_path.read_text()) if history_path.is_file() else {}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DeviseError(f"{folder}: damaged run file ({type(exc).__name__}: {exc})") from None
    model = _load_keras_model(folder / "model.keras") if has_head else None
    return DeviseModel(settings["method"], model, class_names, label_vectors, settings, history, folder,
                       class_columns=columns, name=str(folder))


_loaded: dict[tuple, DeviseModel] = {}
_load_lock = threading.Lock()


def model_name(name_or_path: str | os.PathLike | DeviseModel) -> str:
    """What a model name means, without loading it: a model preset's name or a folder, resolved (the name
    `load` gives the model). A preset name wins over a folder of that name in the working directory (the
    default model must not change with the cwd); such a folder is ./NAME or a Path."""
    if isinstance(name_or_path, DeviseModel):
        return name_or_path.name
    name = str(name_or_path)
    preset = None if isinstance(name_or_path, os.PathLike) else PRESETS.get(name)
    if preset is not None and (preset["kind"] == "model" or not Path(name).is_dir()):
        if preset["kind"] != "model":
            raise DeviseError(f"'{name}' is a training recipe, not a model: train it first "
                              f"(devise train DATASET --preset {name} --out DIR) and load DIR")
        return name
    if Path(name).is_dir():
        return str(Path(name).resolve())
    models = ", ".join(n for n, p in PRESETS.items() if p["kind"] == "model")
    raise DeviseError(f"{name}: no such model (give a preset: {models}; or a run folder made by "
                      "'devise train')")


def model_files_stamp(name: str) -> str | None:
    """A digest of a model folder's files (name, size, mtime), None for a preset: it changes when a run is
    retrained or re-saved in place, so what was computed with the old files (`load`'s cache, a search
    index's embeddings) is not reused."""
    folder = Path(name)
    if name in PRESETS or not folder.is_dir():
        return None
    parts = [f"{f.name}:{st.st_size}:{st.st_mtime_ns}" for f in sorted(folder.iterdir()) if f.is_file()
             for st in (f.stat(),)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def load(name_or_path: str | os.PathLike | DeviseModel = DEFAULT_MODEL, vectors: str | None = None) -> DeviseModel:
    """A preset name (devise.list_presets(kind="model")) or a model folder -> DeviseModel, loaded once
    per process. vectors: another label space for a preset (a run folder records its own)."""
    if isinstance(name_or_path, DeviseModel):
        return name_or_path
    name = model_name(name_or_path)
    preset = PRESETS.get(name)
    if preset is not None:
        key = ("preset", name, str(vectors or preset["vectors"]))
    else:
        key = ("folder", name, model_files_stamp(name))
    with _load_lock:
        if key not in _loaded:
            _loaded[key] = conse_model(preset["backbone"], key[2], preset["T"], name=name) if preset is not None \
                else load_model_folder(name)
        return _loaded[key]
