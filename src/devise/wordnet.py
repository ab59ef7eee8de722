"""WordNet 3.0 noun graph read from the WNdb files (data.noun, index.noun): synsets, lemmas, hop distances.

Ids are "n" + the 8-digit data.noun offset ("n02123045" = tabby.n.01), the ids ImageNet uses.

The graph used for hops and for hierarchical precision is UNDIRECTED: an edge joins a synset and each of
its hypernyms (and, unless `instances=False`, each of its instance hypernyms, e.g. Paris -> city).
Direction does not matter and every edge is one hop, so a sibling is 2 hops away (up to the parent,
down again). Hyponym edges are the same edges seen from the other end.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from devise.errors import DeviseError

_CACHE_VERSION = 1


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
        self.ids: list[str] = list(synsets)
        self.index: dict[str, int] = {wnid: i for i, wnid in enumerate(self.ids)}
        self._lemmas = [tuple(l.replace("_", " ") for l in synsets[w]) for w in self.ids]
        self._glosses = [(glosses or {}).get(w, "") for w in self.ids]
        edges = []  # (child, parent, is_instance)
        for table, flag in ((hypernyms or {}, 0), (instance_hypernyms or {}, 1)):
            for child, parents in table.items():
                for parent in parents:
                    edges.append((self._id(child), self._id(parent), flag))
        edges = np.array(sorted(set(edges)), dtype=np.int32).reshape(-1, 3)
        self._edge_child, self._edge_parent, self._edge_instance = edges[:, 0], edges[:, 1], edges[:, 2].astype(bool)
        if senses is None:
            built: dict[str, list[int]] = {}
            for i, lemmas in enumerate(self._lemmas):
                for lemma in lemmas:
                    built.setdefault(_lemma_key(lemma), []).append(i)
            self._senses = {k: tuple(v) for k, v in built.items()}
        else:
            self._senses = {_lemma_key(k): tuple(self._id(w) for w in v) for k, v in senses.items()}
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
        return [self.ids[i] for i in self._senses.get(_lemma_key(lemma), ())]

    def lemmas(self, wnid: str) -> list[str]:
        """The synset's lemmas as written in WordNet, underscores turned into spaces."""
        return list(self._lemmas[self._id(wnid)])

    def name(self, wnid: str) -> str:
        """The synset's first lemma (the paper's label term)."""
        return self._lemmas[self._id(wnid)][0]

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

def _parse_wndb(folder: Path) -> dict:
    """Read data.noun and index.noun into plain lists (the pickled cache holds exactly this)."""
    ids, lemmas, glosses, hyper, inst = [], [], [], {}, {}
    with open(folder / "data.noun", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            tok = head.split()
            wnid = "n" + tok[0]
            n_words = int(tok[3], 16)
            words = tok[4:4 + 2 * n_words:2]
            pos = 4 + 2 * n_words
            n_ptrs = int(tok[pos])
            parents, iparents = [], []
            for j in range(pos + 1, pos + 1 + 4 * n_ptrs, 4):
                symbol, offset, ptr_pos = tok[j], tok[j + 1], tok[j + 2]
                if ptr_pos != "n":
                    continue
                if symbol == "@":
                    parents.append("n" + offset)
                elif symbol == "@i":
                    iparents.append("n" + offset)
            ids.append(wnid)
            lemmas.append(words)
            glosses.append(gloss.strip())
            if parents:
                hyper[wnid] = parents
            if iparents:
                inst[wnid] = iparents
    senses = {}
    with open(folder / "index.noun", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  "):
                continue
            tok = line.split()
            synset_cnt = int(tok[2])
            senses[tok[0]] = ["n" + off for off in tok[len(tok) - synset_cnt:]]
    return {"synsets": dict(zip(ids, lemmas)), "glosses": dict(zip(ids, glosses)), "hypernyms": hyper,
            "instance_hypernyms": inst, "senses": senses}


def _cache_path(folder: Path) -> Path:
    from devise.assets import data_home
    key = []
    for name in ("data.noun", "index.noun"):
        st = (folder / name).stat()
        key.append(f"{st.st_size}-{int(st.st_mtime)}")
    return data_home() / "wordnet" / f"wn{_CACHE_VERSION}-{'-'.join(key)}.pkl"


def _atomic_pickle(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        except (OSError, ValueError, IndexError) as exc:
            raise DeviseError(f"{folder}/data.noun: not a readable WordNet noun database ({exc})") from None
        try:
            _atomic_pickle(parsed, cache)
        except OSError:
            pass  # a read-only data home only costs speed
    return WordNet(**parsed)


def load_wordnet(path: str | os.PathLike | None = None) -> WordNet:
    """The WordNet 3.0 noun graph from the WNdb folder `path` (default: $WNSEARCHDIR or Debian's); cached."""
    from devise.assets import wordnet_dir
    return _load(str(wordnet_dir(path).resolve()))
