"""WordNet 3.0 noun graph read from the WNdb files (data.noun, index.noun): synsets, lemmas, hop distances.

Ids are "n" + the 8-digit data.noun offset ("n02123045" = tabby.n.01), the ids ImageNet uses.

The graph used for hops and for hierarchical precision is UNDIRECTED: an edge joins a synset and each of
its hypernyms (and, unless `instances=False`, each of its instance hypernyms, e.g. Paris -> national capital).
Direction does not matter and every edge is one hop, so a sibling is 2 hops away (up to the parent,
down again). Hyponym edges are the same edges seen from the other end.
"""
from __future__ import annotations

import os
import pickle
import threading
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from devise.assets import data_home, wordnet_dir
from devise.storage import atomic_write
from devise.errors import DeviseError

_CACHE_VERSION = 2


def _lemma_key(lemma: str) -> str:
    """index.noun's spelling of a lemma: lower case, underscores for spaces."""
    return "_".join(lemma.strip().lower().replace("_", " ").split())


class WordNet:
    """A noun hierarchy: synset ids, their lemmas and glosses, hypernym edges, and a lemma -> synsets index.

    Build the real one with `load_wordnet()`; build a small one for tests directly from plain dicts:

        WordNet(synsets={"n1": ["animal"], "n2": ["cat", "true cat"]}, hypernyms={"n2": ["n1"]})

    synsets: id -> lemmas (spaces or underscores); hypernyms / instance_hypernyms: id -> parent ids;
    glosses: id -> text; senses: lemma -> ids, most frequent sense first (default: the order in which
    the lemma appears in `synsets`).
    """

    def __init__(self, synsets: Mapping[str, Sequence[str]], hypernyms: Mapping[str, Sequence[str]] | None = None,
                 instance_hypernyms: Mapping[str, Sequence[str]] | None = None,
                 glosses: Mapping[str, str] | None = None,
                 senses: Mapping[str, Sequence[str]] | None = None):
        ids = list(synsets)
        index = {wnid: i for i, wnid in enumerate(ids)}

        def pos(wnid):
            if wnid not in index:
                raise DeviseError(f"{wnid!r}: not a noun synset id in this WordNet")
            return index[wnid]

        edges = {(pos(child), pos(parent), flag)
                 for table, flag in ((hypernyms or {}, 0), (instance_hypernyms or {}, 1))
                 for child, parents in table.items() for parent in parents}
        if senses is None:
            built: dict[str, list[int]] = {}
            for i, wnid in enumerate(ids):
                for lemma in synsets[wnid]:
                    built.setdefault(_lemma_key(lemma), []).append(i)
        else:
            built = {_lemma_key(k): [pos(w) for w in v] for k, v in senses.items()}
        self._set_state(_state(ids, ["\t".join(l.replace("_", " ") for l in synsets[w]) for w in ids],
                               [(glosses or {}).get(w, "") for w in ids], sorted(edges), built))

    def _set_state(self, state: dict) -> None:
        """Install the compact form (also what the on-disk cache holds: a few strings and int arrays)."""
        self.ids: list[str] = state["ids"].split("\n") if state["ids"] else []
        self.index: dict[str, int] = dict(zip(self.ids, range(len(self.ids))))
        self._lemma_lines = state["lemmas"].split("\n")
        self._glosses = state["glosses"].split("\n")
        edges = state["edges"]
        self._edge_child, self._edge_parent, self._edge_instance = edges[:, 0], edges[:, 1], edges[:, 2].astype(bool)
        keys = state["sense_keys"].split("\n") if state["sense_keys"] else []
        self._sense_row = dict(zip(keys, range(len(keys))))
        self._sense_ptr, self._sense_ids = state["sense_ptr"], state["sense_ids"]
        self._graphs: dict[bool, tuple[np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------ lookups

    def _id(self, wnid: str) -> int:
        try:
            return self.index[wnid]
        except KeyError:
            raise DeviseError(f"{wnid!r}: not a noun synset id in this WordNet") from None

    def __contains__(self, wnid) -> bool:
        return wnid in self.index

    def __len__(self) -> int:
        return len(self.ids)

    def all_noun_ids(self) -> list[str]:
        """Every synset id, in data.noun order."""
        return list(self.ids)

    def synsets_for(self, lemma: str) -> list[str]:
        """Noun synsets containing `lemma` (case-insensitive, spaces or underscores), most frequent sense first."""
        row = self._sense_row.get(_lemma_key(lemma))
        if row is None:
            return []
        return [self.ids[i] for i in self._sense_ids[self._sense_ptr[row]:self._sense_ptr[row + 1]]]

    def lemmas(self, wnid: str) -> list[str]:
        """The synset's lemmas as written in WordNet, underscores turned into spaces."""
        return self._lemma_lines[self._id(wnid)].split("\t")

    def name(self, wnid: str) -> str:
        """The synset's first lemma (the paper's label term)."""
        return self._lemma_lines[self._id(wnid)].split("\t", 1)[0]

    def gloss(self, wnid: str) -> str:
        """The synset's definition and examples."""
        return self._glosses[self._id(wnid)]

    def hypernyms(self, wnid: str, instances: bool = True) -> list[str]:
        """Parents of `wnid`; instance hypernyms included unless instances=False."""
        mask = self._edge_child == self._id(wnid)
        if not instances:
            mask &= ~self._edge_instance
        return [self.ids[i] for i in self._edge_parent[mask]]

    def hyponyms(self, wnid: str, instances: bool = True) -> list[str]:
        """Children of `wnid`; instance hyponyms included unless instances=False."""
        mask = self._edge_parent == self._id(wnid)
        if not instances:
            mask &= ~self._edge_instance
        return [self.ids[i] for i in self._edge_child[mask]]

    # ------------------------------------------------------------ graph

    def graph(self, instances: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Undirected adjacency in CSR form (indptr, neighbours) over integer ids (positions in `ids`)."""
        if instances not in self._graphs:
            keep = np.ones(len(self._edge_child), bool) if instances else ~self._edge_instance
            a = np.concatenate([self._edge_child[keep], self._edge_parent[keep]])
            b = np.concatenate([self._edge_parent[keep], self._edge_child[keep]])
            order = np.lexsort((b, a))
            a, b = a[order], b[order]
            indptr = np.zeros(len(self.ids) + 1, np.int64)
            np.cumsum(np.bincount(a, minlength=len(self.ids)), out=indptr[1:])
            self._graphs[instances] = (indptr, b.astype(np.int32))
        return self._graphs[instances]

    def neighbours_of(self, nodes: np.ndarray, instances: bool = True) -> np.ndarray:
        """All neighbours of the integer ids `nodes` (with repeats), gathered without a Python loop."""
        indptr, nbrs = self.graph(instances)
        starts, ends = indptr[nodes], indptr[nodes + 1]
        counts = ends - starts
        if counts.sum() == 0:
            return np.empty(0, np.int32)
        # positions starts[i] .. ends[i]-1 for every i, concatenated
        offsets = np.repeat(starts - np.cumsum(counts) + counts, counts)
        return nbrs[offsets + np.arange(counts.sum())]

    def hop_distances_idx(self, sources: Iterable[int], max_hops: int, instances: bool = True) -> dict[int, int]:
        """Breadth-first hop distances from the integer ids `sources` (distance 0) up to `max_hops`."""
        dist = {int(s): 0 for s in sources}
        frontier = np.fromiter(dist, np.int64, len(dist))
        seen = np.zeros(len(self.ids), bool)
        seen[frontier] = True
        for hop in range(1, max_hops + 1):
            nxt = np.unique(self.neighbours_of(frontier, instances))
            nxt = nxt[~seen[nxt]]
            if len(nxt) == 0:
                break
            seen[nxt] = True
            dist.update(dict.fromkeys(nxt.tolist(), hop))
            frontier = nxt.astype(np.int64)
        return dist


# ------------------------------------------------------------------ hop sets

def hop_distances(sources: Iterable[str], max_hops: int, wordnet: WordNet | None = None,
                  instances: bool = True) -> dict[str, int]:
    """{synset id: hops to the nearest source} for every synset within `max_hops` of any source.

    Hops are counted on the undirected graph of hypernym + hyponym edges (instance edges included
    unless instances=False): direction does not matter, each edge is one hop; sources are at 0.
    """
    wn = wordnet or load_wordnet()
    dist = wn.hop_distances_idx([wn._id(s) for s in sources], max_hops, instances)
    return {wn.ids[i]: d for i, d in dist.items()}


def zero_shot_label_sets(training_wnids: Iterable[str | None], candidates: Iterable[str],
                         hops: Sequence[int] = (2, 3), include_training: bool = False,
                         wordnet: WordNet | None = None, instances: bool = True) -> dict[int, list[str]]:
    """The paper's zero-shot label sets: {n: candidates within n hops of ANY training label}.

    Hops as in `hop_distances` (undirected hypernym/hyponym edges, instance edges included).
    Candidates keep their given order; candidates that are training labels are left out, and candidates
    not in WordNet are never reached. With include_training=True (the paper's "+1K" sets) every
    training label is appended after the zero-shot labels. None training ids (labels without a synset)
    are skipped.
    """
    wn = wordnet or load_wordnet()
    training = list(dict.fromkeys(w for w in training_wnids if w is not None))
    dist = hop_distances(training, max(hops), wn, instances)
    train_set = set(training)
    candidates = list(dict.fromkeys(candidates))
    sets = {}
    for n in hops:
        chosen = [c for c in candidates if dist.get(c, n + 1) <= n and c not in train_set]
        sets[n] = chosen + training if include_training else chosen
    return sets


# ------------------------------------------------------------------ reading WNdb files

def _state(ids: list[str], lemma_lines: list[str], glosses: list[str], edges, senses: dict[str, list[int]]) -> dict:
    """The compact form of a WordNet: newline-joined strings and int arrays (fast to pickle and load)."""
    keys = list(senses)
    ptr = np.zeros(len(keys) + 1, np.int64)
    np.cumsum([len(senses[k]) for k in keys], out=ptr[1:])
    flat = [i for k in keys for i in senses[k]]
    return {"ids": "\n".join(ids), "lemmas": "\n".join(lemma_lines), "glosses": "\n".join(g.replace("\n", " ") for g in glosses),
            "edges": np.array(edges, np.int32).reshape(-1, 3), "sense_keys": "\n".join(keys),
            "sense_ptr": ptr, "sense_ids": np.array(flat, np.int32)}


def _parse_wndb(folder: Path) -> dict:
    """Read data.noun and index.noun into the compact form (what the pickled cache holds)."""
    ids, lemma_lines, glosses, raw_edges = [], [], [], []
    with open(folder / "data.noun", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            tok = head.split()
            n_words = int(tok[3], 16)
            pos = 4 + 2 * n_words
            child = len(ids)
            for j in range(pos + 1, pos + 1 + 4 * int(tok[pos]), 4):
                symbol = tok[j]
                if (symbol == "@" or symbol == "@i") and tok[j + 2] == "n":
                    raw_edges.append((child, "n" + tok[j + 1], symbol == "@i"))
            ids.append("n" + tok[0])
            lemma_lines.append("\t".join(tok[4:pos:2]).replace("_", " "))
            glosses.append(gloss.strip())
    index = dict(zip(ids, range(len(ids))))
    edges = sorted({(child, index[parent], int(inst)) for child, parent, inst in raw_edges})
    senses = {}
    with open(folder / "index.noun", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  "):
                continue
            tok = line.split()
            synset_cnt = int(tok[2])
            senses[tok[0]] = [index["n" + off] for off in tok[len(tok) - synset_cnt:]]
    return _state(ids, lemma_lines, glosses, edges, senses)


def _cache_path(folder: Path) -> Path:
    key = []
    for name in ("data.noun", "index.noun"):
        st = (folder / name).stat()
        key.append(f"{st.st_size}-{int(st.st_mtime)}")
    return data_home() / "wordnet" / f"wn{_CACHE_VERSION}-{'-'.join(key)}.pkl"


def _atomic_pickle(obj, path: Path) -> None:
    def write(tmp):
        with open(tmp, "wb") as fh:
            pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)

    atomic_write(path, write)


@lru_cache(maxsize=4)
def _load(folder: str) -> WordNet:
    folder = Path(folder)
    cache = _cache_path(folder)
    parsed = None
    if cache.is_file():
        try:
            with open(cache, "rb") as fh:
                parsed = pickle.load(fh)
        except Exception:  # a stale or truncated cache is rebuilt, never trusted
            parsed = None
    if parsed is None:
        try:
            parsed = _parse_wndb(folder)
        except (OSError, ValueError, IndexError, KeyError) as exc:
            raise DeviseError(f"{folder}/data.noun: not a readable WordNet noun database ({exc})") from None
        try:
            _atomic_pickle(parsed, cache)
        except (OSError, DeviseError):  # storage says a failed write as a DeviseError
            pass  # a read-only or full data home only costs speed
    wordnet = WordNet.__new__(WordNet)
    wordnet._set_state(parsed)
    return wordnet


def load_wordnet(path: str | os.PathLike | None = None) -> WordNet:
    """The WordNet 3.0 noun graph from the WNdb folder `path` (default: $WNSEARCHDIR or Debian's); cached,
    and read once however many threads ask at once (lru_cache alone lets each of them read it)."""
    with _load_lock:
        return _load(str(wordnet_dir(path).resolve()))


_load_lock = threading.Lock()
