"""Vocabularies: the label spaces images are named in, embedded once and cached in the data home.

A `Vocabulary` is a set of terms scored by cosine (the rows of a unit matrix) and the entries (label,
synset) they expand to, in rank order:
- "wordnet": every WordNet 3.0 noun synset that gets a vector by the label rule (the paper's 21K-like
  space, here ~80K synsets). Synsets whose vector comes from the same term have identical rows; they are
  scored once, as that term, and the term is expanded to its synsets in WordNet sense order, as in the
  paper's appendix A.2 (4k nearest terms, expanded, duplicates dropped, first k kept);
- "imagenet1k": the 1000 ImageNet class names (synset = the class's WordNet id);
- a FILE: one label per line (words, phrases or WordNet ids; blank lines and "#" comments skipped);
  a word's synset is its most frequent WordNet noun sense, or null;
- any labels given in code: `Vocabulary.of_labels(labels, matrix)` (DeviseModel.encode_labels' matrix).
Scoring and ranking against a vocabulary: devise.evaluation.ranking.
"""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from devise import defaults
from devise.assets import data_home, imagenet1k_classes
from devise.storage import cached_npz
from devise.errors import DeviseError
from devise.labels.vectors import LABEL_RULE_VERSION, SYNSET_ID, embed_labels, label_list, load_vectors, quiet_dropped_labels, unit_rows
from devise.labels.wordnet import load_wordnet

VOCAB_VERSION = "2"  # 2: label-file words and ImageNet names are embedded linked to their synsets
VOCABS = ("wordnet", "imagenet1k")


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

    @classmethod
    def of_labels(cls, labels, matrix, synsets=None, name: str = "labels") -> Vocabulary:
        """One entry per label, scored by its row of `matrix` (L, D) (made unit length here)."""
        labels = label_list(labels)
        matrix = np.asarray(matrix, np.float32)
        if matrix.ndim != 2 or len(matrix) != len(labels):
            raise DeviseError(f"{len(labels)} labels but a label matrix of shape {matrix.shape}")
        synsets = [None] * len(labels) if synsets is None else [str(s) if s else None for s in synsets]
        if len(synsets) != len(labels):
            raise DeviseError(f"{len(labels)} labels but {len(synsets)} synsets")
        return cls(name, unit_rows(matrix), labels, synsets, np.arange(len(labels), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def one_per_term(self) -> bool:
        return len(self.labels) == len(self.matrix)

    def term_entries(self) -> list[list[int]]:
        starts = np.searchsorted(self.entry_term, np.arange(len(self.matrix) + 1))
        return [list(range(starts[t], starts[t + 1])) for t in range(len(self.matrix))]


# ---------------------------------------------------------------- label files

def excerpt(data, limit: int = 40) -> str:
    """A repr-escaped, truncated excerpt of file content for an error message (never raw binary)."""
    text = repr(data[:limit])
    return text + ("..." if len(data) > limit else "")


def read_label_lines(path: Path) -> list[str]:
    """The lines of a label file; binary garbage is an error quoting an escaped excerpt of the bad line."""
    path = Path(path)
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


def read_label_file(path: Path) -> list[str]:
    """The labels of a label file: one per line, stripped, deduplicated; blank lines and "#" comments skipped."""
    lines = read_label_lines(path)
    labels = list(dict.fromkeys(l.strip() for l in lines if l.strip() and not l.strip().startswith("#")))
    if not labels:
        raise DeviseError(f"{path}: no labels in the file (one label per line)")
    return labels


# ---------------------------------------------------------------- building a vocabulary

def _build_wordnet_vocab(vectors) -> tuple[np.ndarray, list[str], list[str | None], np.ndarray]:
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
    if vocab == "wordnet":
        return _build_wordnet_vocab(vectors)
    if vocab == "imagenet1k":
        classes = imagenet1k_classes()
        # linked to their synsets: a sentence encoder embeds them as it embeds ConSE's classes
        emb = embed_labels([c["name"] for c in classes], vectors, drop_missing=True,
                           synsets=[c["wnid"] for c in classes])
        wnid = {c["name"]: c["wnid"] for c in classes}
        labels, synsets = list(emb.labels), [wnid[n] for n in emb.labels]
    else:
        wordnet = load_wordnet()
        names = read_label_file(Path(vocab))
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


def _invalid_vocab(a: dict) -> str | None:
    """What is wrong with a cached vocabulary's arrays, or None."""
    matrix, entry_term = a["matrix"], a["entry_term"]
    if matrix.ndim != 2 or entry_term.ndim != 1 or not (len(a["labels"]) == len(a["synsets"]) == len(entry_term)):
        return (f"matrix {matrix.shape}, {len(a['labels'])} labels, {len(a['synsets'])} synsets, "
                f"{len(entry_term)} entries")
    if len(entry_term) and (entry_term.min() < 0 or entry_term.max() >= len(matrix)):
        return "an entry points past the matrix"
    return None if np.isfinite(matrix).all() else "non-finite rows in the matrix"


_vocab_cache: dict[str, Vocabulary] = {}
_vocab_lock = threading.Lock()


def load_vocabulary(vocab: str | os.PathLike = "wordnet", vectors_spec: str = defaults.VECTORS,
                    drop_missing: bool = False) -> Vocabulary:
    """'wordnet', 'imagenet1k' or a label FILE, embedded with the vectors of `vectors_spec`; cached on disk.

    drop_missing: leave out a FILE's labels that have no vector (a warning lists them) instead of an error;
    the built-in vocabularies always hold only the labels that have one.
    """
    vocab = str(vocab)
    if vocab not in VOCABS and not Path(vocab).is_file():
        raise DeviseError(f"{vocab}: vocabulary must be 'wordnet', 'imagenet1k' or a file with one label per line")
    vectors = load_vectors(vectors_spec)
    key = _vocab_key(vocab, str(vectors_spec), int(vectors.dim), drop_missing)
    with _vocab_lock:
        if key in _vocab_cache:
            return _vocab_cache[key]

        def compute() -> dict:
            matrix, labels, synsets, entry_term = _build_vocab(vocab, vectors, drop_missing)
            return {"matrix": matrix, "labels": np.array(labels, dtype=str),
                    "synsets": np.array([s or "" for s in synsets], dtype=str), "entry_term": entry_term}

        data = cached_npz(data_home() / "vocab" / f"{key}.npz", ("matrix", "labels", "synsets", "entry_term"),
                          compute, _invalid_vocab)
        matrix, labels, synsets, entry_term = data["matrix"], data["labels"], data["synsets"], data["entry_term"]
        name = vocab if vocab in VOCABS else Path(vocab).name
        result = Vocabulary(name, np.asarray(matrix, np.float32), [str(l) for l in labels],
                            [str(s) if s else None for s in synsets], np.asarray(entry_term, np.int64))
        _vocab_cache[key] = result
        return result
