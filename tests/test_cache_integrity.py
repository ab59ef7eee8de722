"""Caches in the data home that go wrong: damaged files (made here: cut short, not a zip, rows that disagree,
NaN) are said in one line, removed and computed again; two real processes computing one cache compute it
once and lose nothing; a long text encoding interrupted by SIGINT keeps its shards and the next run goes on
from them."""
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import devise.labels.vectors as V
from devise.models.text_encoder import EncodingCache

GLOVE = "glove-6b-50d"


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "cut short":
        path.write_bytes(data[: len(data) // 2])
    elif how == "not a zip":
        path.write_bytes(b"\0garbage\n" * 50)
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(how)


def _one_warning(record, path) -> str:
    messages = [str(w.message) for w in record if "damaged cache" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in record]
    assert str(path) in messages[0] and "\n" not in messages[0], messages[0]
    return messages[0]


@pytest.fixture
def home(tmp_path, monkeypatch):
    folder = tmp_path / "home"
    monkeypatch.setenv("DEVISE_HOME", str(folder))
    return folder


def test_damaged_text_vector_shards_are_said_removed_and_encoded_again(home):
    encoder = V.SentenceEncoder()
    texts = ["tabby cat", "fire truck", "a cup of coffee", "water buffalo"]
    want = encoder.encode(texts)
    folder = encoder.cache.folder
    [shard] = folder.glob("*.npz")
    good = shard.read_bytes()
    keys = np.load(shard)["keys"]
    damages = {"cut short": None, "not a zip": None, "empty": None,
               "rows disagree": {"keys": keys, "vectors": want[:3]},
               "NaN rows": {"keys": keys, "vectors": np.full_like(want, np.nan)}}
    for how, arrays in damages.items():
        shard.write_bytes(good)
        if arrays is None:
            _damage(shard, how)
        else:
            with open(shard, "wb") as fh:
                np.savez(fh, **arrays)
        encoder.cache = EncodingCache(folder)  # nothing in memory, as in a new process
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = encoder.encode(texts)
        _one_warning(record, shard)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=how)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # what is on disk now reads back whole
            cached, missing = EncodingCache(folder).lookup(texts, encoder.dim)
        assert missing == [] and np.allclose(cached, want, atol=1e-5), how


def test_damaged_vectors_vocabulary_and_class_vector_caches_are_recomputed(home, tmp_path):
    from devise.labels import vocabulary
    from devise.models.conse import cached_imagenet1k_class_vectors

    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nwater buffalo\nteapot\n")
    vectors = V.load_vectors(GLOVE)
    want_cat = np.array(vectors.vector("cat"))
    want_vocab = vocabulary.load_vocabulary(labels, GLOVE).matrix
    want_kept, want_class = cached_imagenet1k_class_vectors(GLOVE)
    [converted] = [p for p in (home / "vectors").iterdir() if p.is_dir() and not p.name.startswith(".")]
    [vocab_file] = [p for p in (home / "vocab").glob("*.npz") if not p.name.startswith("conse")]
    [class_file] = (home / "vocab").glob("conse-*.npz")

    cases = [("matrix.npy cut short", converted / "matrix.npy", converted),
             ("words.json cut short", converted / "words.json", converted),
             ("vocabulary cut short", vocab_file, vocab_file), ("class vectors not a zip", class_file, class_file)]
    killed = [vocab_file.with_name(f".{vocab_file.name}.x1.tmp"), converted.with_name(f".{converted.name}.x2.tmp")]
    killed[0].write_bytes(b"half an npz")  # what writers killed half-way leave: removed by the next writer
    (killed[1] / "matrix.npy").parent.mkdir()
    for name, target, said in cases:
        _damage(target, "not a zip" if "zip" in name else "cut short")
        vocabulary._vocab_cache.clear()  # as a new process would
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            np.testing.assert_array_equal(V.load_vectors(GLOVE).vector("cat"), want_cat, err_msg=name)
            np.testing.assert_allclose(vocabulary.load_vocabulary(labels, GLOVE).matrix, want_vocab, atol=1e-6)
            kept, class_vectors = cached_imagenet1k_class_vectors(GLOVE)
        _one_warning(record, said)
        np.testing.assert_array_equal(kept, want_kept)
        np.testing.assert_allclose(class_vectors, want_class, atol=1e-6)
        assert target.is_file(), name  # computed again and saved
    assert not any(p.exists() for p in killed)

    # A vocabulary whose arrays are whole but disagree, or hold NaN, is not trusted either.
    with np.load(vocab_file) as z:
        arrays = dict(z)
    for name, change in (("entries", {"entry_term": arrays["entry_term"][:-1]}),
                         ("NaN", {"matrix": np.full_like(arrays["matrix"], np.nan)})):
        with open(vocab_file, "wb") as fh:
            np.savez(fh, **{**arrays, **change})
        vocabulary._vocab_cache.clear()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            np.testing.assert_allclose(vocabulary.load_vocabulary(labels, GLOVE).matrix, want_vocab, atol=1e-6)
        _one_warning(record, vocab_file)


CHILD_COMPUTES_VOCABULARY = """
import sys, time
from pathlib import Path
from devise.models import conse
from devise.labels import vocabulary, vectors
built = []
for module, name in ((vocabulary, "_build_vocab"), (conse, "imagenet1k_class_vectors")):
    real = getattr(module, name)
    def counted(*args, _real=real, _name=name, **kwargs):  # the real function, counted
        built.append(_name)
        return _real(*args, **kwargs)
    setattr(module, name, counted)
vectors.load_vectors("glove-6b-50d")
start = Path(sys.argv[1])
start.with_name(start.name + sys.argv[2]).touch()
while len(list(start.parent.glob(start.name + "*"))) < 2:  # both ready: go at once
    time.sleep(0.01)
matrix = vocabulary.load_vocabulary(sys.argv[3], "glove-6b-50d").matrix
kept, class_vectors = conse.cached_imagenet1k_class_vectors("glove-6b-50d")
print("BUILT " + ",".join(built))
print("SUM %.6f %.6f" % (matrix.sum(), class_vectors.sum()))
"""

CHILD_ADDS_SHARDS = """
import sys, hashlib
import numpy as np
from devise.models.text_encoder import EncodingCache
cache = EncodingCache(sys.argv[1])
cache.MERGE_AT = 4  # merging all the time: the two processes merge over each other
def vector(text):
    return np.random.default_rng(int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)).standard_normal(8)
for i in range(60):
    texts = [f"{sys.argv[2]} text {i} {j}" for j in range(3)]
    cache.add(texts, np.stack([vector(t) for t in texts]).astype(np.float32))
"""


def test_two_processes_compute_a_cache_once_and_lose_nothing(home, tmp_path):
    V.load_vectors(GLOVE)  # the converted vectors, once, before the race
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(["cat", "dog", "water buffalo", "teapot", "fire truck"] * 3) + "\n")
    env = {**os.environ, "DEVISE_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD_COMPUTES_VOCABULARY, str(tmp_path / "ready-"), name,
                               str(labels)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in "ab"]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    built = [line.removeprefix("BUILT ") for out, _ in outs for line in out.splitlines() if line.startswith("BUILT")]
    sums = {line for out, _ in outs for line in out.splitlines() if line.startswith("SUM")}
    computed = sorted(name for line in built for name in line.split(",") if name)
    assert computed == ["_build_vocab", "imagenet1k_class_vectors"], built  # each once, by either process
    assert len(sums) == 1, sums  # both read the same arrays

    folder = tmp_path / "text-cache"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD_ADDS_SHARDS, str(folder), name],
                              stderr=subprocess.PIPE, text=True) for name in "ab"]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errors]
    assert not any("damaged" in e for e in errors), errors
    texts = [f"{name} text {i} {j}" for name in "ab" for i in range(60) for j in range(3)]
    out, missing = EncodingCache(folder).lookup(texts, 8)
    assert missing == []
    for text, row in zip(texts, out):
        want = np.random.default_rng(int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)).standard_normal(8)
        np.testing.assert_allclose(row, want.astype(np.float32))
    assert len(list(folder.glob("*.npz"))) < 8  # merged, not 120 shards


CHILD_ENCODES_LONG_LIST = """
import sys
import devise.models.text_encoder as T
import devise.labels.vectors as V
T.SAVE_EVERY_S = 0.5  # a shard every half second (each of at least PROGRESS_MIN texts)
texts = [line for line in open(sys.argv[1]).read().splitlines()]
print("encoding", flush=True)
V.SentenceEncoder().encode(texts)
print("finished", flush=True)
"""


@pytest.mark.slow
def test_interrupted_long_encoding_keeps_its_shards_and_the_next_run_goes_on(home, tmp_path):
    """SIGINT (Ctrl-C) after some shards are written: they stay, whole; the next run encodes only the rest."""
    words = "cat dog bird fish car truck boat plane train house tree flower apple coffee cup chair".split()
    texts = [f"{words[i % 16]} {words[(i // 16) % 16]} number {i}" for i in range(6000)]
    (tmp_path / "texts.txt").write_text("\n".join(texts))
    child = subprocess.Popen([sys.executable, "-c", CHILD_ENCODES_LONG_LIST, str(tmp_path / "texts.txt")],
                             env={**os.environ, "DEVISE_HOME": str(home)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    shards = []
    deadline = time.monotonic() + 300
    while len(shards) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        shards = list(home.glob("text-vectors/minilm-*/*.npz"))
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert len(shards) >= 2, f"no shards written while encoding: {err[-1500:]}"
    assert "finished" not in out and child.returncode != 0, (out, err[-1500:])

    encoder = V.SentenceEncoder()
    kept, missing = encoder.cache.lookup(texts, encoder.dim)
    done = sorted(set(range(len(texts))) - set(missing))
    assert 1000 <= len(done) < len(texts), len(done)
    sample = done[:: max(1, len(done) // 50)]
    np.testing.assert_allclose(kept[sample], encoder.encoder.encode([texts[i] for i in sample]), atol=1e-5)

    before = {p.name for p in encoder.cache.folder.glob("*.npz")}
    encoded = []
    encoder.cache.add = lambda texts, vectors, merge=True, _add=encoder.cache.add: (  # noqa: E731 - counted
        encoded.extend(texts), _add(texts, vectors, merge))
    everything = encoder.encode(texts)
    assert sorted(encoded) == sorted(texts[i] for i in missing)  # only the rest was encoded
    np.testing.assert_allclose(everything[sample], kept[sample], atol=1e-6)
    assert EncodingCache(encoder.cache.folder).lookup(texts, encoder.dim)[1] == []
    assert before  # shards of the interrupted run were read, not thrown away
