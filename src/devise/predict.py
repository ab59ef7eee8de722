"""Open-vocabulary prediction: images -> unit vectors in the label space -> nearest labels of any vocabulary.

An `Embedder` maps images into the word-vector space:
- "conse" (the default, no training): the backbone's ImageNet-1K softmax mixed over the vectors of the
  ImageNet class names (ConSE, T=10);
- a trained run folder (`devise train ... --out DIR`): the run's own map from backbone features.

A `Vocabulary` is the label space searched:
- "wordnet": every WordNet 3.0 noun synset that gets a vector by the label rule (the paper's 21K-like
  space, here ~80K synsets). Synsets whose vector comes from the same term have identical rows; they are
  scored once, as that term, and the term is expanded to its synsets in WordNet sense order, as in the
  paper's appendix A.2 (4k nearest terms, expanded, duplicates dropped, first k kept);
- "imagenet1k": the 1000 ImageNet class names (synset = the class's WordNet id);
- a FILE: one label per line (words, phrases or WordNet ids; blank lines and "#" comments skipped);
  a word's synset is its most frequent WordNet noun sense, or null.
Vocabulary matrices are cached in the data home.

Hubness (a few labels nearest to every image) can be reduced with `hubness=`:
- "csls" (Conneau et al. 2018): score = 2 cos(x, l) - r_l, where r_l is the mean cosine of label l to
  its K=10 nearest images in a reference set (the image-side term is constant per image and dropped);
- "center": score = cos(x, l) - mean cosine of label l over the reference set.
The reference set is `reference=` (image embeddings, or a search index folder), else the query images.
"""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from devise import defaults
from devise.assets import atomic_save_npz
from devise.errors import DeviseError
from devise.vectors import quiet_dropped_labels, unit_rows

VOCAB_VERSION = "2"  # 2: label-file words and ImageNet names are embedded linked to their synsets
VOCABS = ("wordnet", "imagenet1k")
HUBNESS = ("csls", "center")
CSLS_K = 10
MIN_REFERENCE = 20  # fewer reference images than this make the hubness statistics meaningless
CONSE_T = 10
LOAD_CHUNK = 256  # images decoded per chunk (bounds memory on big folders)


def _bucket(n: int, batch_size: int) -> int:
    """Padded batch size: the next power of two up to batch_size (a handful of compiled shapes, and a
    single uploaded image does not pay for a full batch)."""
    size = 1
    while size < n and size < batch_size:
        size *= 2
    return min(size, batch_size)


# ---------------------------------------------------------------- embedders

class Embedder:
    """Images -> unit vectors in the label space of `vectors_spec`. Thread-safe; load with `load_embedder`."""

    name: str
    vectors_spec: str
    backbone = None

    def __init__(self, batch_size: int = 32):
        self.batch_size = batch_size
        self._forward = None
        self._lock = threading.Lock()

    @property
    def vectors(self):
        from devise.vectors import load_vectors
        return load_vectors(self.vectors_spec)

    def embed_features(self, features: np.ndarray, logits: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> unit (N, D), in fixed-size padded batches (never one image at a time)."""
        from devise.features import backbone_forward
        from devise.runtime import pad_batch

        with self._lock:
            if self._forward is None:
                self._forward = backbone_forward(self.backbone)
        out = []
        for start in range(0, len(images), self.batch_size):
            m = min(self.batch_size, len(images) - start)
            chunk = pad_batch(images[start:start + self.batch_size], _bucket(m, self.batch_size))
            # One forward at a time: concurrent requests (the web server) share one model, and only the
            # JAX path is re-entrant; on a CPU a batch already uses every core.
            with self._lock:
                feats, logits = self._forward(chunk)
                feats = np.asarray(feats)[:m]
                logits = np.asarray(logits)[:m] if logits is not None else None
            out.append(self.embed_features(feats, logits))
        dim = self.dim
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    def embed_paths(self, paths: list[str], progress: bool = False, cache: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Image files -> (unit (N, D), valid (N,) bool). Unreadable files get zero rows, valid False, and
        one warning listing them. cache=True takes backbone features from the on-disk feature cache
        (devise.features: computed once, resumable), for collections that are embedded again (indexes)."""
        from devise.images import load_images

        if cache and paths:
            from devise.features import extract_features

            fs = extract_features(list(paths), self.backbone, progress=progress)
            logits = fs.logits if fs.logits is not None else None
            embs = [self.embed_features(np.asarray(fs.features[i:i + 4096], np.float32),
                                        None if logits is None else np.asarray(logits[i:i + 4096], np.float32))
                    for i in range(0, len(paths), 4096)]
            emb, valid = np.concatenate(embs), np.asarray(fs.valid, bool)
            emb[~valid] = 0.0
            return emb, valid

        size = self.backbone.image_size
        embs, valid = [], []
        with tqdm(total=len(paths), desc=f"embedding ({self.name})", unit="img", disable=not progress) as bar:
            for start in range(0, len(paths), LOAD_CHUNK):
                images, ok = load_images(paths[start:start + LOAD_CHUNK], size)
                emb = self.embed_images(images)
                emb[~ok] = 0.0
                embs.append(emb)
                valid.append(ok)
                bar.update(len(ok))
        if not embs:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, bool)
        return np.concatenate(embs), np.concatenate(valid)


class ConseEmbedder(Embedder):
    """ConSE over the backbone's ImageNet-1K classifier: no training needed."""

    def __init__(self, backbone=defaults.BACKBONE, vectors_spec: str = defaults.VECTORS, T: int = CONSE_T,
                 batch_size: int = 32):
        from devise.backbones import load_backbone
        from devise.conse import cached_imagenet1k_class_vectors

        super().__init__(batch_size)
        self.name, self.vectors_spec, self.T = "conse", vectors_spec, T
        self.backbone = load_backbone(backbone) if isinstance(backbone, str) else backbone
        if self.backbone.classifier is None:
            raise DeviseError(f"backbone '{self.backbone.name}' has no ImageNet classifier: ConSE needs one")
        with quiet_dropped_labels():  # the few ImageNet names without a vector are expected, not news
            self.kept, self.class_vectors = cached_imagenet1k_class_vectors(vectors_spec)
        self.dim = self.class_vectors.shape[1]
        self.cache_key = f"conse-T{T}-{self.backbone.cache_key}-{vectors_spec}"

    def embed_features(self, features, logits):
        from devise.conse import conse_from_logits
        return conse_from_logits(logits, self.class_vectors, self.kept, self.T)


class RunEmbedder(Embedder):
    """A trained run folder: backbone features -> the run's learned map into the word space."""

    def __init__(self, run_dir: str | os.PathLike, batch_size: int = 32):
        from devise.backbones import load_backbone
        from devise.train import load_run

        super().__init__(batch_size)
        self.run = load_run(run_dir)
        if self.run.method == "random":
            # The control maps images onto random label vectors: against real word vectors its
            # scores mean nothing, so refuse rather than print confident nonsense.
            raise DeviseError(f"{run_dir}: a random-embedding control run cannot name or search images "
                              "(it exists to show the benchmark's word vectors carry the knowledge)")
        settings = getattr(self.run, "settings", {}) or {}
        self.name = str(run_dir)
        self.vectors_spec = str(settings.get("vectors") or "glove-6b-50d")
        if settings.get("backbone_weights"):  # a fine-tuned run (devise finetune) embeds with its own backbone
            from devise.finetune import load_backbone_from_run
            self.backbone = load_backbone_from_run(self.run)
        else:
            backbone = settings.get("backbone") or "efficientnet_lite0"
            self.backbone = load_backbone(backbone) if isinstance(backbone, str) else backbone
        self.dim = int(self.vectors.dim)
        stat = max((p.stat().st_mtime_ns for p in Path(run_dir).iterdir() if p.is_file()), default=0)
        self.cache_key = f"run-{Path(run_dir).resolve()}-{stat}"

    def embed_features(self, features, logits):
        with self._lock:  # Keras model.predict is not re-entrant across threads (the web server)
            return unit_rows(self.run.embed(features))


@lru_cache(maxsize=4)
def _load_embedder(model: str, vectors_spec: str) -> Embedder:
    if model == "conse":
        return ConseEmbedder(vectors_spec=vectors_spec)
    if not Path(model).is_dir():
        raise DeviseError(f"{model}: no such run folder (give a folder made by 'devise train' or 'conse')")
    return RunEmbedder(model)


def load_embedder(model: str | os.PathLike | Embedder = "conse", vectors_spec: str | None = None) -> Embedder:
    """'conse' or a trained run folder -> Embedder (loaded once per process). vectors_spec: the label space
    of ConSE (default: the default label space; a run folder records its own)."""
    if isinstance(model, Embedder):
        return model
    if str(model) == "conse":
        return _load_embedder("conse", str(vectors_spec or defaults.VECTORS))
    return _load_embedder(str(Path(model).resolve()), "")


# ---------------------------------------------------------------- vocabularies

@dataclass
class Vocabulary:
    """Terms scored by cosine (matrix rows) and the entries they expand to (label, synset) in rank order.

    entry_term[e] is the term (row) entry e came from; a term's entries are contiguous, best sense first.
    """

    name: str
    matrix: np.ndarray  # (T, D) unit float32
    labels: list[str]  # per entry
    synsets: list[str | None]  # per entry
    entry_term: np.ndarray  # (E,) int

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def one_per_term(self) -> bool:
        return len(self.labels) == len(self.matrix)

    def term_entries(self) -> list[list[int]]:
        starts = np.searchsorted(self.entry_term, np.arange(len(self.matrix) + 1))
        return [list(range(starts[t], starts[t + 1])) for t in range(len(self.matrix))]


def excerpt(data, limit: int = 40) -> str:
    """A repr-escaped, truncated excerpt of file content for an error message (never raw binary)."""
    text = repr(data[:limit])
    return text + ("..." if len(data) > limit else "")


def read_label_lines(path: Path) -> list[str]:
    """The lines of a label file; binary garbage is an error quoting an escaped excerpt of the bad line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DeviseError(f"{path}: cannot read the label file ({exc.strerror or exc.__class__.__name__})") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Windows editors) is not content
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise DeviseError(f"{path}:{number}: not UTF-8 text, not a label file ({excerpt(line)})") from None
        if any(not c.isprintable() for c in text.rstrip("\r").replace("\t", " ")):
            raise DeviseError(f"{path}:{number}: control characters in a label, not a label file ({excerpt(text)})")
    return raw.decode("utf-8").splitlines()


def _read_label_file(path: Path) -> list[str]:
    lines = read_label_lines(path)
    labels = list(dict.fromkeys(l.strip() for l in lines if l.strip() and not l.strip().startswith("#")))
    if not labels:
        raise DeviseError(f"{path}: no labels in the file (one label per line)")
    return labels


def _build_wordnet_vocab(vectors) -> tuple[np.ndarray, list[str], list[str | None], np.ndarray]:
    from devise.vectors import embed_labels
    from devise.wordnet import load_wordnet

    wordnet = load_wordnet()
    with quiet_dropped_labels():  # synsets without a vector simply are not in this vocabulary
        emb = embed_labels(wordnet.all_noun_ids(), vectors, wordnet=wordnet, drop_missing=True)
    matrix = np.ascontiguousarray(emb.matrix, np.float32)
    # Identical rows come from the same term: score it once, expand it to its synsets (appendix A.2).
    _, first, term_of = np.unique(matrix.view(np.dtype((np.void, matrix.dtype.itemsize * matrix.shape[1]))),
                                  return_index=True, return_inverse=True)
    term_of = term_of.reshape(-1)
    order_terms = np.argsort(first, kind="stable")  # terms in WordNet data order of their first synset
    renumber = np.empty_like(order_terms)
    renumber[order_terms] = np.arange(len(order_terms))
    term_of = renumber[term_of]

    def sense_rank(wnid: str) -> int:
        senses = wordnet.synsets_for(wordnet.name(wnid))
        return senses.index(wnid) if wnid in senses else len(senses)

    entries = sorted(range(len(emb.labels)), key=lambda i: (term_of[i], sense_rank(emb.labels[i]), i))
    synsets = [emb.labels[i] for i in entries]
    labels = [wordnet.name(w) for w in synsets]
    return matrix[np.sort(first)], labels, synsets, term_of[entries].astype(np.int64)


def _build_vocab(vocab: str, vectors, drop_missing: bool = False) -> tuple[np.ndarray, list[str], list[str | None], np.ndarray]:
    from devise.vectors import SYNSET_ID, embed_labels

    if vocab == "wordnet":
        return _build_wordnet_vocab(vectors)
    if vocab == "imagenet1k":
        from devise.assets import imagenet1k_classes
        classes = imagenet1k_classes()
        # linked to their synsets: a sentence encoder embeds them as it embeds ConSE's classes
        emb = embed_labels([c["name"] for c in classes], vectors, drop_missing=True,
                           synsets=[c["wnid"] for c in classes])
        wnid = {c["name"]: c["wnid"] for c in classes}
        labels, synsets = list(emb.labels), [wnid[n] for n in emb.labels]
    else:
        from devise.wordnet import load_wordnet
        wordnet = load_wordnet()
        names = _read_label_file(Path(vocab))
        # A word stands for its most frequent noun sense (a sentence encoder reads that sense's hypernym).
        first_sense = {n: (wordnet.synsets_for(n) or [None])[0] for n in names if not SYNSET_ID.match(n)}
        emb = embed_labels(names, vectors, wordnet=wordnet, drop_missing=drop_missing,
                           synsets=[first_sense.get(n) for n in names])
        if not emb.labels:
            raise DeviseError(f"{vocab}: none of its labels has a vector in {vectors.name}")
        labels, synsets = [], []
        for label in emb.labels:
            if SYNSET_ID.match(label) and label in wordnet:
                labels.append(wordnet.name(label))
                synsets.append(label)
            else:
                labels.append(label)
                synsets.append(first_sense[label])
    return np.asarray(emb.matrix, np.float32), labels, synsets, np.arange(len(labels), dtype=np.int64)


def _vocab_key(vocab: str, vectors_spec: str, dim: int, drop_missing: bool = False) -> str:
    from devise.vectors import LABEL_RULE_VERSION

    digest = hashlib.sha256(f"{VOCAB_VERSION}|{LABEL_RULE_VERSION}|{vocab}|{vectors_spec}|{dim}".encode())
    if drop_missing and vocab not in VOCABS:  # a FILE without its missing labels is another vocabulary
        digest.update(b"|drop-missing")
    if vocab not in VOCABS:
        digest.update(Path(vocab).read_bytes())
    spec = Path(vectors_spec)
    if spec.is_file():
        st = spec.stat()
        digest.update(f"|{spec.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


_vocab_cache: dict[str, Vocabulary] = {}
_vocab_lock = threading.Lock()


def load_vocabulary(vocab: str | os.PathLike = "wordnet", vectors_spec: str = defaults.VECTORS,
                    drop_missing: bool = False) -> Vocabulary:
    """'wordnet', 'imagenet1k' or a label FILE, embedded with the vectors of `vectors_spec`; cached on disk.

    drop_missing: leave out a FILE's labels that have no vector (a warning lists them) instead of an error;
    the built-in vocabularies always hold only the labels that have one.
    """
    from devise.assets import data_home
    from devise.vectors import load_vectors

    vocab = str(vocab)
    if vocab not in VOCABS and not Path(vocab).is_file():
        raise DeviseError(f"{vocab}: vocabulary must be 'wordnet', 'imagenet1k' or a file with one label per line")
    vectors = load_vectors(vectors_spec)
    key = _vocab_key(vocab, str(vectors_spec), int(vectors.dim), drop_missing)
    with _vocab_lock:
        if key in _vocab_cache:
            return _vocab_cache[key]
        path = data_home() / "vocab" / f"{key}.npz"
        data = None
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    data = (z["matrix"], list(z["labels"]), [s or None for s in z["synsets"]], z["entry_term"])
            except (OSError, ValueError, KeyError):
                data = None  # a damaged cache is rebuilt, never trusted
        if data is None:
            data = _build_vocab(vocab, vectors, drop_missing)
            matrix, labels, synsets, entry_term = data
            atomic_save_npz(path, matrix=matrix, labels=np.array(labels, dtype=str),
                             synsets=np.array([s or "" for s in synsets], dtype=str), entry_term=entry_term)
        matrix, labels, synsets, entry_term = data
        name = vocab if vocab in VOCABS else Path(vocab).name
        result = Vocabulary(name, np.asarray(matrix, np.float32), [str(l) for l in labels],
                            [str(s) if s else None for s in synsets], np.asarray(entry_term, np.int64))
        _vocab_cache[key] = result
        return result


# ---------------------------------------------------------------- scoring

def label_statistics(reference: np.ndarray, matrix: np.ndarray, k: int = CSLS_K,
                     chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per label: (mean cosine to its k nearest reference images, mean cosine over all of them)."""
    reference = unit_rows(reference)
    k = min(k, len(reference))
    knn_mean = np.empty(len(matrix), np.float32)
    mean = np.empty(len(matrix), np.float32)
    for lo in range(0, len(matrix), chunk):
        sims = reference @ matrix[lo:lo + chunk].T  # (M, chunk)
        mean[lo:lo + chunk] = sims.mean(axis=0)
        knn_mean[lo:lo + chunk] = np.partition(sims, len(reference) - k, axis=0)[len(reference) - k:].mean(axis=0)
    return knn_mean, mean


def _resolve_reference(reference, queries: np.ndarray) -> np.ndarray:
    if reference is None:
        reference = queries
    elif isinstance(reference, (str, os.PathLike)):
        from devise.search import load_index
        reference = load_index(reference).embeddings
    reference = np.asarray(reference, np.float32)
    if len(reference) < MIN_REFERENCE:
        raise DeviseError(f"hubness correction needs at least {MIN_REFERENCE} reference images, got "
                          f"{len(reference)}: predict more images at once or pass a reference index")
    return reference


def score_labels(embeddings: np.ndarray, vocabulary: Vocabulary, hubness: str | None = None,
                 reference=None) -> np.ndarray:
    """(N, D) unit image embeddings -> (N, T) term scores, hubness-corrected if asked."""
    if hubness not in (None, *HUBNESS):
        raise DeviseError(f"hubness must be one of {', '.join(HUBNESS)}, not '{hubness}'")
    if embeddings.shape[1] != vocabulary.matrix.shape[1]:
        raise DeviseError(f"embeddings are {embeddings.shape[1]}-d but vocabulary '{vocabulary.name}' is "
                          f"{vocabulary.matrix.shape[1]}-d (different word vectors)")
    scores = embeddings @ vocabulary.matrix.T
    if hubness is not None:
        knn_mean, mean = label_statistics(_resolve_reference(reference, embeddings), vocabulary.matrix)
        scores = 2 * scores - knn_mean if hubness == "csls" else scores - mean
    return scores


def rank_labels(scores: np.ndarray, vocabulary: Vocabulary, top_k: int) -> list[list[dict]]:
    """(N, T) term scores -> per image the top_k [{"label", "synset", "score"}] (appendix A.2 expansion)."""
    from devise.metrics import expand_to_synsets, top_k_indices

    if top_k < 1:
        raise DeviseError(f"top_k must be at least 1, not {top_k}")
    if vocabulary.one_per_term:
        entries = top_k_indices(scores, top_k)
    else:
        ranked = top_k_indices(scores, 4 * top_k)
        entries = expand_to_synsets(ranked, vocabulary.term_entries(), top_k)
    results = []
    for row, picks in zip(scores, entries):
        results.append([{"label": vocabulary.labels[e], "synset": vocabulary.synsets[e],
                         "score": round(float(row[vocabulary.entry_term[e]]), 6)} for e in picks if e >= 0])
    return results


# ---------------------------------------------------------------- the API

def expand_image_paths(paths, skipped: list[str] | None = None) -> list[str]:
    """Files as given; folders replaced by the image files below them (sorted), by the one walker
    (devise.images.scan_image_files). Entries that are not readable files (broken or looping links,
    FIFOs, sockets...) are left out and listed in one warning, or appended to `skipped` for a caller
    that reports them in its own warning."""
    from devise.images import scan_image_files, warn_skipped

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out, bad = scan_image_files(paths)
    if not out:
        raise DeviseError("no image files found in: " + ", ".join(str(p) for p in paths)
                          + (f" (skipped: {'; '.join(bad)})" if bad else ""))
    if skipped is None:
        warn_skipped(bad)
    else:
        skipped.extend(bad)
    return out


def predict_arrays(images: np.ndarray, model="conse", vocab="wordnet", top_k: int = 5,
                   hubness: str | None = None, reference=None, vectors: str | None = None) -> list[list[dict]]:
    """uint8 (N, S, S, 3) images -> per image its top_k predictions."""
    embedder = load_embedder(model, vectors)
    vocabulary = vocab if isinstance(vocab, Vocabulary) else load_vocabulary(vocab, embedder.vectors_spec)
    return rank_labels(score_labels(embedder.embed_images(images), vocabulary, hubness, reference),
                       vocabulary, top_k)


def predict(paths, model="conse", vocab="wordnet", top_k: int = 5, hubness: str | None = None,
            reference=None, progress: bool = False, drop_missing: bool = False,
            vectors: str | None = None) -> list[dict]:
    """Open-vocabulary labels for image files (folders expand to their images), embedded in batches.

    vectors: ConSE's label space (default: the default one); a run folder brings its own.

    Returns [{"image": PATH, "predictions": [{"label", "synset", "score"}, ...]}] in rank order; score is
    the cosine (or the hubness-corrected score). Unreadable files are reported in one warning and left out.
    """
    paths = expand_image_paths([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    embedder = load_embedder(model, vectors)
    vocabulary = vocab if isinstance(vocab, Vocabulary) else \
        load_vocabulary(vocab, embedder.vectors_spec, drop_missing=drop_missing)
    embeddings, valid = embedder.embed_paths(paths, progress=progress)
    if not valid.any():
        raise DeviseError("none of the images could be read: " + ", ".join(paths[:5]))
    kept = [p for p, ok in zip(paths, valid) if ok]
    ranked = rank_labels(score_labels(embeddings[valid], vocabulary, hubness, reference), vocabulary, top_k)
    return [{"image": p, "predictions": preds} for p, preds in zip(kept, ranked)]


def format_table(results: list[dict], score_format: str = "{:+.3f}") -> str:
    """Readable text: the image path, then one line per prediction (rank, score, label, synset)."""
    lines = []
    for result in results:
        lines.append(result["image"])
        for rank, pred in enumerate(result["predictions"], 1):
            synset = f"  ({pred['synset']})" if pred["synset"] else ""
            lines.append(f"  {rank}. {score_format.format(pred['score'])}  {pred['label']}{synset}")
    return "\n".join(lines)
