"""Phase 1 of the paper: a small real corpus and skip-gram word vectors (gensim), saved in word2vec format.

The corpus joins the 1913 Webster's dictionary (Debian dict-gcide) and WordNet's glosses. The glosses
spell out the WordNet hierarchy that hp@k scores with: say so when reporting results from these vectors.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
from pathlib import Path

from tqdm import tqdm

from devise.assets import wordnet_dir
from devise.errors import DeviseError
from devise.labels.vectors import WordVectors, load_vectors

log = logging.getLogger(__name__)

TOKEN = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*")
GCIDE_FILE = Path("/usr/share/dictd/gcide.dict.dz")


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens (letters, inner hyphens and apostrophes kept)."""
    return TOKEN.findall(text.lower())


def _gcide_paragraphs(path: Path):
    """Paragraphs of the 1913 Webster's (dictd format, gzip-compatible), markup removed.

    The dictd metadata and licence text before the first headword ("Word \\Pro*nun"ci*a`tion\\") are skipped.
    """
    markup = re.compile(r"\[[^\]]*\]|\\[^\\\n]*\\|[{}]|--[A-Z][\w. ]*")
    headword = re.compile(r"^\S[^\\]*\\[^\\]+\\")
    started = False
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        para: list[str] = []
        for line in f:
            if line.strip():
                started = started or bool(headword.match(line))
                if started:
                    para.append(line)
                continue
            if para:
                yield markup.sub(" ", " ".join(para))
                para = []
        if para:
            yield markup.sub(" ", " ".join(para))


def _wordnet_gloss_lines(folder: Path):
    """One line per WordNet synset: its lemmas (multiword ones joined by "_") then its gloss."""
    for pos in ("noun", "verb", "adj", "adv"):
        with open(folder / f"data.{pos}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):  # licence header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split(" ")
                count = int(fields[3], 16)
                lemmas = [re.sub(r"\([a-z]+\)$", "", fields[4 + 2 * i]).lower() for i in range(count)]
                yield lemmas, gloss


def build_corpus(out: str | os.PathLike, sources: tuple[str, ...] = ("gcide", "wordnet"),
                 max_lines: int | None = None) -> dict:
    """Write a small real English corpus (one tokenised paragraph per line) for skip-gram training.

    gcide: Debian's dict-gcide, the 1913 Webster's dictionary (~4M tokens; apt-get install dict-gcide);
    wordnet: WordNet 3.0 lemmas and glosses (~1.8M tokens). Note: the glosses spell out the WordNet
    hierarchy that hierarchical precision is scored on ("a tabby is a domestic cat ..."), so vectors
    trained on them are not independent of that metric. If dict-gcide is missing, the corpus is the
    glosses alone and a warning says so. Returns {"path", "lines", "tokens", "sources"}.
    """
    sources = tuple(sources)
    unknown = set(sources) - {"gcide", "wordnet"}
    if unknown or not sources:
        raise DeviseError(f"{','.join(sorted(unknown)) or '(none)'}: unknown corpus source (use gcide, wordnet)")
    used = []
    if "gcide" in sources:
        if GCIDE_FILE.is_file():
            used.append("gcide")
        else:
            log.warning("%s not found (apt-get install dict-gcide): the corpus is WordNet glosses only", GCIDE_FILE)
    if "wordnet" in sources or not used:
        wn = wordnet_dir()
        used.append("wordnet")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    lines = tokens = 0
    with open(tmp, "w", encoding="utf-8") as f, tqdm(desc="corpus", unit=" lines") as bar:
        def write(words: list[str]) -> bool:
            nonlocal lines, tokens
            if words:
                f.write(" ".join(words) + "\n")
                lines += 1
                tokens += len(words)
                bar.update(1)
            return max_lines is not None and lines >= max_lines
        done = False
        if "wordnet" in used:
            for lemmas, gloss in _wordnet_gloss_lines(wn):
                if done := write(lemmas + tokenize(gloss)):
                    break
        if "gcide" in used and not done:
            for para in _gcide_paragraphs(GCIDE_FILE):
                if write(tokenize(para)):
                    break
    os.replace(tmp, out)
    return {"path": str(out), "lines": lines, "tokens": tokens, "sources": used}


class _Sentences:
    """Re-iterable token lists of a corpus file (one sentence per line), advancing a tqdm bar."""

    def __init__(self, path: Path, bar):
        self.path, self.bar = path, bar

    def __iter__(self):
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                self.bar.update(1)
                words = line.split()
                if words:
                    yield words


def train_skipgram(corpus_path: str | os.PathLike, out: str | os.PathLike, dim: int = 100,
                   window: int = 10, epochs: int = 5, min_count: int = 5, workers: int = 2,
                   seed: int = 0, binary: bool | None = None) -> WordVectors:
    """Train skip-gram word vectors with hierarchical softmax (gensim Word2Vec sg=1, hs=1, as the paper)
    on a text file of whitespace-tokenised sentences (one per line), save them in word2vec format
    (binary when out ends in .bin, or binary=True; else text) atomically, and return them loaded.

    The paper used window 20 and one pass over 5.4B words; on a corpus of a few million tokens more
    passes and a shorter window (defaults 5 and 10) work better.
    """
    from gensim.models import Word2Vec

    corpus_path, out = Path(corpus_path), Path(out)
    if not corpus_path.is_file():
        raise DeviseError(f"{corpus_path}: no such corpus file")
    if dim < 1 or epochs < 1 or window < 1 or min_count < 1:
        raise DeviseError(f"dim, window, epochs and min_count must be >= 1 (got {dim}, {window}, {epochs}, {min_count})")
    with open(corpus_path, "rb") as f:
        n_lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))
    if n_lines == 0:
        raise DeviseError(f"{corpus_path}: empty corpus")
    with tqdm(total=n_lines * (epochs + 1), desc="skip-gram (vocab + epochs)", unit=" lines") as bar:
        sentences = _Sentences(corpus_path, bar)
        model = Word2Vec(vector_size=dim, window=window, min_count=min_count, sg=1, hs=1, negative=0,
                         workers=workers, seed=seed)
        model.build_vocab(sentences)
        if len(model.wv) == 0:
            raise DeviseError(f"{corpus_path}: no word occurs {min_count} times (lower --min-count)")
        model.train(sentences, total_examples=model.corpus_count, epochs=epochs)
    binary = out.suffix == ".bin" if binary is None else binary
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    model.wv.save_word2vec_format(str(tmp), binary=binary)
    os.replace(tmp, out)
    return load_vectors(out, format="word2vec-bin" if binary else "text")
