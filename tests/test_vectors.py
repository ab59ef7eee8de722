"""Phase 1: vectors files in every format, the label rule, errors, the cache, skip-gram (real GloVe, WordNet)."""
import gzip
import logging
import os
import re
import time

import numpy as np
import pytest

from devise.labels import skipgram as S
from devise.labels import vectors as V
from devise.assets import glove_6b_50d_files
from devise.cli import main
from devise.errors import DeviseError

SAMPLE_WORDS = ["cat", "dog", "truck", "water", "buffalo", "tabby", "kite", "shirt", "t-shirt", "top",
                "cup", "coffee", "potter", "wheel", "hog-nosed", "x-ray", "ice-cream"]


@pytest.fixture(scope="session")
def glove():
    return V.load_vectors("glove-6b-50d")


@pytest.fixture(scope="session")
def raw_rows():
    """A few hundred real GloVe words with their raw (not normalised) vectors."""
    emb_path, _ = glove_6b_50d_files()
    glove = V.load_vectors("glove-6b-50d")
    words = list(dict.fromkeys(glove.words[100:400] + SAMPLE_WORDS))
    raw = np.load(emb_path, mmap_mode="r")
    return words, np.stack([raw[glove.index[w]] for w in words]).astype(np.float32)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh data home so every test parses its files itself."""
    folder = tmp_path / "home"
    monkeypatch.setenv("DEVISE_HOME", str(folder))
    return folder


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """4000 lines of real text: WordNet lemmas and glosses."""
    out = tmp_path_factory.mktemp("corpus") / "wordnet4k.txt"
    stats = S.build_corpus(out, sources=("wordnet",), max_lines=4000)
    assert stats["lines"] == 4000 and stats["tokens"] > 40_000 and stats["sources"] == ["wordnet"]
    return out


def _unit(m):
    return m / np.linalg.norm(m, axis=-1, keepdims=True)


def _write_text(path, words, rows, header=True, trailing=""):
    with open(path, "w", encoding="utf-8") as f:
        if header:
            f.write(f"{len(words)} {rows.shape[1]}\n")
        for w, r in zip(words, rows):
            f.write(w + " " + " ".join(f"{x:.6f}" for x in r) + trailing + "\n")


# ---------------------------------------------------------------- the packaged GloVe

def test_packaged_glove_is_unit_norm_cached_and_semantic(glove):
    assert len(glove) == 400_000 and glove.dim == 50 and glove.matrix.dtype == np.float32
    assert np.allclose(np.linalg.norm(glove.matrix[:1000], axis=1), 1, atol=1e-5)
    cos = lambda a, b: float(glove.vector(a) @ glove.vector(b))  # noqa: E731
    assert cos("cat", "dog") > 0.85 > 0.4 > cos("cat", "truck")
    assert "cat" in glove and "zzqxw" not in glove
    with pytest.raises(KeyError):
        glove.vector("zzqxw")
    again = V.load_vectors("glove-6b-50d")  # the second load memory-maps the cached matrix
    assert again.cache_dir == glove.cache_dir and isinstance(again.matrix, np.memmap)
    assert (again.cache_dir / "words.json").is_file()


# ---------------------------------------------------------------- every file format

@pytest.mark.parametrize("kind", ["word2vec-text", "word2vec-bin", "glove", "fasttext-vec", "glove-gz"])
def test_every_text_and_binary_format_loads(kind, raw_rows, tmp_path, home):
    from gensim.models import KeyedVectors
    words, rows = raw_rows
    path = tmp_path / {"word2vec-bin": "vecs.bin", "glove-gz": "vecs.txt.gz"}.get(kind, "vecs.txt")
    if kind.startswith("word2vec"):  # written by gensim, the reference writer of the word2vec formats
        kv = KeyedVectors(vector_size=rows.shape[1])
        kv.add_vectors(words, rows)
        kv.save_word2vec_format(str(path), binary=kind == "word2vec-bin")
    elif kind == "fasttext-vec":
        _write_text(path, words, rows, header=True, trailing=" ")  # fastText ends lines with a space
    elif kind == "glove":
        _write_text(path, words, rows, header=False)
    else:
        plain = tmp_path / "plain.txt"
        _write_text(plain, words, rows, header=False)
        path.write_bytes(gzip.compress(plain.read_bytes()))
    assert V._detect_format(path) == ("word2vec-bin" if kind == "word2vec-bin" else "text")
    vecs = V.load_vectors(path)
    assert vecs.words == words and vecs.dim == 50 and vecs.cache_dir.parent == home / "vectors"
    np.testing.assert_allclose(vecs.matrix, _unit(rows), atol=2e-5)
    cos = lambda a, b: float(vecs.vector(a) @ vecs.vector(b))  # noqa: E731
    assert cos("cat", "dog") > cos("cat", "truck")
    # the same file, format forced and no cache
    forced = V.load_vectors(path, format="bin" if kind == "word2vec-bin" else "glove", cache=False)
    assert forced.cache_dir is None and forced.words == words


def test_fast_and_exact_text_parsers_agree_and_words_may_have_spaces(raw_rows, tmp_path, home):
    words, rows = raw_rows
    path = tmp_path / "vecs.vec"
    _write_text(path, words, rows, header=True, trailing=" ")
    fast, exact = np.zeros_like(rows), np.zeros_like(rows)
    assert V._fill_with_pyarrow(path, fast, True, 50, len(words)) == words
    assert V._fill_line_by_line(path, exact, True, 50, len(words)) == words
    np.testing.assert_allclose(fast, exact, atol=1e-7)
    spaced = [w if i != 7 else ". . ." for i, w in enumerate(words)]  # GloVe 840B has such words
    _write_text(path, spaced, rows, header=False)
    assert V._fill_with_pyarrow(path, fast, False, 50, len(words)) is None  # the exact parser takes over
    vecs = V.load_vectors(path)
    assert vecs.words == spaced and ". . ." in vecs
    np.testing.assert_allclose(vecs.matrix, _unit(rows), atol=2e-5)


def test_fasttext_bin_loads_through_gensim(small_corpus, tmp_path, home):
    from gensim.models import FastText
    from gensim.models.fasttext import save_facebook_model
    sentences = [line.split() for line in small_corpus.read_text().splitlines()]
    model = FastText(sentences, vector_size=16, window=3, min_count=3, epochs=1, workers=2, seed=0,
                     bucket=20_000)
    path = tmp_path / "tiny.bin"
    save_facebook_model(model, str(path))
    assert V._detect_format(path) == "fasttext-bin"
    vecs = V.load_vectors(path)
    assert vecs.words == list(model.wv.index_to_key) and vecs.dim == 16
    np.testing.assert_allclose(vecs.matrix[:50], _unit(model.wv.vectors[:50]), atol=1e-5)


def test_forced_wrong_format_and_bad_specs_are_errors(raw_rows, tmp_path, home):
    words, rows = raw_rows
    path = tmp_path / "glove.txt"
    _write_text(path, words, rows, header=False)
    with pytest.raises(DeviseError, match=r"glove.txt:1: not a word2vec binary file"):
        V.load_vectors(path, format="word2vec-bin")
    with pytest.raises(DeviseError, match="unknown vectors format"):
        V.load_vectors(path, format="xml")
    with pytest.raises(DeviseError, match="nope.vec: no such vectors file"):
        V.load_vectors(tmp_path / "nope.vec")
    with pytest.raises(DeviseError, match="one of: minilm, glove-6b-50d"):  # unknown names list the sources
        V.load_vectors("glove-6b-51d")


def test_vector_sources_registry_and_unit_rows():
    assert V.list_vectors() == ["minilm", "glove-6b-50d"] and V.GLOVE_SPEC in V.VECTOR_SOURCES
    assert all(source.description for source in V.VECTOR_SOURCES.values())
    rows = V.unit_rows([[3.0, 4.0], [0.0, 0.0]])  # zero rows stay zero...
    np.testing.assert_allclose(rows, [[0.6, 0.8], [0.0, 0.0]])
    with pytest.raises(DeviseError, match="row 1 .*all zeros"):  # ...unless strict
        V.unit_rows([[3.0, 4.0], [0.0, 0.0]], strict=True)
    with pytest.raises(DeviseError, match="2-d"):
        V.unit_rows([3.0, 4.0])


# ---------------------------------------------------------------- garbled and truncated files

def test_garbled_and_truncated_files_name_file_and_line(raw_rows, tmp_path, home):
    words, rows = raw_rows
    good = tmp_path / "good.txt"
    _write_text(good, words[:30], rows[:30], header=False)
    lines = good.read_text().splitlines(keepends=True)

    short = tmp_path / "vecs.txt"  # line 17 cut after 12 numbers
    short.write_text("".join(lines[:16] + [" ".join(lines[16].split()[:13]) + "\n"] + lines[17:]))
    with pytest.raises(DeviseError, match=r"vecs.txt:17: expected 50 numbers \(as on line 1\), got 12$"):
        V.load_vectors(short)

    long_line = tmp_path / "long.txt"  # a vector with more numbers than the others
    long_line.write_text("".join(lines[:4] + [lines[4].rstrip("\n") + " 0.5 0.25\n"] + lines[5:]))
    with pytest.raises(DeviseError, match=r"long.txt:5: expected 50 numbers \(as on line 1\), got 52$"):
        V.load_vectors(long_line)

    garbled = tmp_path / "garbled.txt"
    garbled.write_text("".join(lines[:8] + [lines[8].replace(lines[8].split()[3], "0.1x7", 1)] + lines[9:]))
    with pytest.raises(DeviseError, match=r"garbled.txt:9: '0.1x7' is not a number"):
        V.load_vectors(garbled)

    header_dim = tmp_path / "dim.vec"  # header says 40-d, the vectors are 50-d
    header_dim.write_text("30 40\n" + "".join(lines))
    with pytest.raises(DeviseError, match=r"dim.vec:2: expected 40 numbers, got 50$"):
        V.load_vectors(header_dim)

    cut = tmp_path / "cut.vec"  # the header promises 30 vectors, the file stops after 20
    cut.write_text("30 50\n" + "".join(lines[:20]))
    with pytest.raises(DeviseError, match=r"cut.vec:21: truncated: the header says 30 vectors, found 20"):
        V.load_vectors(cut)

    from gensim.models import KeyedVectors
    kv = KeyedVectors(vector_size=50)
    kv.add_vectors(words[:30], rows[:30])
    binary = tmp_path / "vecs.bin"
    kv.save_word2vec_format(str(binary), binary=True)
    binary.write_bytes(binary.read_bytes()[:-100])
    with pytest.raises(DeviseError, match=r"vecs.bin: record 30 .*expected 50 numbers, got 25 \(truncated\)"):
        V.load_vectors(binary)
    assert not list((home / "vectors").glob("*/words.json"))  # no half-written cache entries


def test_second_load_of_a_text_file_is_served_from_the_cache(raw_rows, tmp_path, home):
    words, rows = raw_rows
    path = tmp_path / "vecs.txt"
    _write_text(path, words, rows, header=False)
    first = V.load_vectors(path)
    assert isinstance(first.matrix, np.memmap)
    # Garble the file keeping its size and mtime: the cache key is unchanged, so the file is not re-read.
    st = path.stat()
    data = bytearray(path.read_bytes())
    dot = data.index(b".")
    data[dot] = ord("x")  # "0.123" -> "0x123" on line 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = V.load_vectors(path)
    assert second.cache_dir == first.cache_dir and second.words == words
    np.testing.assert_array_equal(second.matrix, first.matrix)
    # A new mtime is a new file: parsed again, and the garbling is found.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DeviseError, match=r"vecs.txt:1: '-?\d+x\d+' is not a number"):
        V.load_vectors(path)


# ---------------------------------------------------------------- the label rule

def test_phrase_rule(glove):
    labels = ["cat", "x ray", "water buffalo", "kite (bird of prey)", "cup of coffee", "potter's wheel",
              "t-shirt/top", "frilled-necked lizard", "Granny Smith", "zzqxw dog"]
    emb = V.embed_labels(labels, glove)
    got = dict(zip(emb.labels, emb.matrix))
    v = glove.vector
    assert emb.labels == labels and emb.matrix.shape == (10, 50) and emb.matrix.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb.matrix, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(got["cat"], v("cat"), atol=1e-6)
    np.testing.assert_allclose(got["x ray"], v("x-ray"), atol=1e-6)  # whole phrase as one token
    np.testing.assert_allclose(got["water buffalo"], _unit(v("water") + v("buffalo")), atol=1e-6)
    np.testing.assert_allclose(got["kite (bird of prey)"], v("kite"), atol=1e-6)  # parentheses disambiguate
    np.testing.assert_allclose(got["cup of coffee"], _unit(v("cup") + v("coffee")), atol=1e-6)  # no stopwords
    np.testing.assert_allclose(got["potter's wheel"], _unit(v("potter") + v("wheel")), atol=1e-6)
    np.testing.assert_allclose(got["t-shirt/top"], _unit(v("t-shirt") + v("top")), atol=1e-6)
    assert "frilled-necked" not in glove  # a hyphenated word without a vector: the mean of its parts
    frilled = _unit(v("frilled") + v("necked"))
    np.testing.assert_allclose(got["frilled-necked lizard"], _unit(frilled + v("lizard")), atol=1e-6)
    np.testing.assert_allclose(got["Granny Smith"], _unit(v("granny") + v("smith")), atol=1e-6)
    np.testing.assert_allclose(got["zzqxw dog"], v("dog"), atol=1e-6)  # half the words covered is enough
    assert emb.partial == ["zzqxw dog"] and emb.dropped == []
    assert emb.source[1] == "token 'x-ray'" and emb.source[2] == "mean of water + buffalo"
    with pytest.raises(DeviseError, match="'zzqxw qqzxv dog'"):  # a third is not
        V.embed_labels(["zzqxw qqzxv dog"], glove)


def test_synset_rule_uses_the_first_lemma_with_a_vector(glove):
    from devise.labels.wordnet import load_wordnet
    labels = ["n02123045", "n03016953", "n02403003"]  # tabby, chiffonier/commode, ox
    emb = V.embed_labels(labels, glove)
    assert V.synset_lemmas("n03016953") == ["chiffonier", "commode"] and "chiffonier" not in glove
    np.testing.assert_allclose(emb.matrix[0], glove.vector("tabby"), atol=1e-6)
    np.testing.assert_allclose(emb.matrix[1], glove.vector("commode"), atol=1e-6)
    assert emb.source[1] == "synset lemma 'commode': token 'commode'"
    # the project's WordNet reader gives the same lemmas and the same vectors
    with_wn = V.embed_labels(labels, glove, wordnet=load_wordnet())
    np.testing.assert_allclose(with_wn.matrix, emb.matrix, atol=1e-6)
    with pytest.raises(DeviseError, match="'n99999999'"):
        V.embed_labels(["n99999999"], glove)


def test_missing_labels_error_lists_them_and_drop_missing_reports(glove, caplog):
    missing = [f"zzq{chr(97 + i)}xw" for i in range(25)]
    labels = ["cat"] + missing + ["dog"]
    with pytest.raises(DeviseError) as err:
        V.embed_labels(labels, glove)
    message = str(err.value)
    assert "\n" not in message and message.startswith("25 of 27 labels have no vector in glove-6b-50d")
    assert all(repr(m) in message for m in missing[:20]) and repr(missing[20]) not in message
    assert "and 5 more" in message
    with caplog.at_level(logging.WARNING, logger="devise.labels.vectors"):
        emb = V.embed_labels(labels, glove, drop_missing=True)
    assert emb.labels == ["cat", "dog"] and emb.dropped == missing and emb.matrix.shape == (2, 50)
    assert "dropped 25 labels" in caplog.text
    report = emb.coverage_report()
    assert report.startswith("2/27 labels embedded with glove-6b-50d (50-d)")
    assert "25 dropped (no vector): 'zzqaxw'" in report and "and 5 more" in report


def test_imagenet_names_coverage(glove):
    from devise.assets import imagenet1k_classes
    classes = imagenet1k_classes()
    names = V.embed_labels([c["name"] for c in classes], glove, drop_missing=True)
    wnids = V.embed_labels([c["wnid"] for c in classes], glove, drop_missing=True)
    assert len(names.labels) >= 980 and len(wnids.labels) >= 985
    assert "brambling" in names.dropped  # a rare bird name GloVe 6B lacks: reported, never random


# ---------------------------------------------------------------- corpus and skip-gram

def test_skipgram_trains_on_a_small_real_corpus_and_loads(small_corpus, tmp_path, home):
    start = time.perf_counter()
    text_vecs = S.train_skipgram(small_corpus, tmp_path / "sg.txt", dim=32, window=5, epochs=3, min_count=3)
    assert time.perf_counter() - start < 60
    assert text_vecs.dim == 32 and len(text_vecs) > 1000 and "animal" in text_vecs
    assert (tmp_path / "sg.txt").read_text().split("\n", 1)[0] == f"{len(text_vecs)} 32"
    again = V.load_vectors(tmp_path / "sg.txt")
    assert again.words == text_vecs.words
    # the CLI writes word2vec binary for .bin
    assert main(["vectors", "train", str(small_corpus), "--dim", "16", "--epochs", "1", "--min-count", "3",
                 "--out", str(tmp_path / "sg.bin")]) == 0
    binary = V.load_vectors(tmp_path / "sg.bin")
    assert V._detect_format(tmp_path / "sg.bin") == "word2vec-bin" and binary.dim == 16
    assert set(binary.words) == set(text_vecs.words)


def test_corpus_from_webster_and_wordnet(tmp_path, monkeypatch, caplog):
    stats = S.build_corpus(tmp_path / "gcide.txt", sources=("gcide",), max_lines=300)
    assert stats["sources"] == ["gcide"] and stats["lines"] == 300
    text = (tmp_path / "gcide.txt").read_text()
    assert text == text.lower() and not {"webster", "gnu", "gcide"} & set(text.split())  # markup, licence gone
    assert text.startswith("adj indicating the absence of any or all units")  # the first entry ("0")
    assert main(["vectors", "corpus", "--out", str(tmp_path / "c.txt"), "--max-lines", "50"]) == 0
    first = (tmp_path / "c.txt").read_text().splitlines()[0]
    assert first.startswith("entity ")  # WordNet's first noun synset, lemma then gloss
    monkeypatch.setattr(S, "GCIDE_FILE", tmp_path / "absent.dict.dz")
    with caplog.at_level(logging.WARNING, logger="devise.labels.skipgram"):
        stats = S.build_corpus(tmp_path / "wn.txt", max_lines=20)
    assert stats["sources"] == ["wordnet"] and "WordNet glosses only" in caplog.text


def test_cli_vectors_info(capsys):
    assert main(["vectors", "info", "glove-6b-50d", "--labels", "imagenet1k"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("glove-6b-50d: 400000 words x 50\n") and "/1000 labels embedded" in out
    assert main(["vectors", "info", "no-such-file.vec"]) == 2


# ---------------------------------------------------------------- non-finite and all-zero vectors

@pytest.mark.parametrize("kind,bad", [(k, b) for k in ("glove", "word2vec-text", "fasttext-vec", "word2vec-bin")
                                      for b in ("nan", "inf", "zeros")]
                         + [("fasttext-bin", "nan"), ("fasttext-bin", "inf")])  # its word vectors add n-grams: never all zero
def test_nan_inf_and_all_zero_vectors_are_errors_naming_file_line_and_word(kind, bad, raw_rows, tmp_path, home):
    words, rows = raw_rows
    words, rows = words[:40], rows[:40].copy()
    rows[12] = 0.0 if bad == "zeros" else rows[12]
    rows[12, 7] = {"nan": np.nan, "inf": np.inf}.get(bad, 0.0)
    what = {"nan": r"vector has a non-finite value \(nan\)", "inf": r"vector has a non-finite value \(inf\)",
            "zeros": "vector is all zeros"}[bad]
    word = repr(words[12])
    if kind == "fasttext-bin":  # a real model from gensim with one vector replaced
        from gensim.models import FastText
        from gensim.models.fasttext import save_facebook_model
        model = FastText([words[:20], words[20:]] * 5, vector_size=8, min_count=1, epochs=1, workers=1, seed=0,
                         bucket=1000)
        vocab = model.wv.index_to_key
        model.wv.vectors_vocab[5, 3] = {"nan": np.nan, "inf": np.inf}[bad]  # loading adds its n-gram vectors
        path = tmp_path / "vecs.bin"
        save_facebook_model(model, str(path))
        word = repr(vocab[5])
        expected = rf"vecs.bin: record 6 \({re.escape(word)}\): {what}$"
    elif kind == "word2vec-bin":
        from gensim.models import KeyedVectors
        kv = KeyedVectors(vector_size=50)
        kv.add_vectors(words, rows)
        path = tmp_path / "vecs.bin"
        kv.save_word2vec_format(str(path), binary=True)
        expected = rf"vecs.bin: record 13 \({re.escape(word)}\): {what}$"
    else:
        path = tmp_path / "vecs.txt"
        _write_text(path, words, rows, header=kind != "glove", trailing=" " if kind == "fasttext-vec" else "")
        line = 13 if kind == "glove" else 14
        expected = rf"vecs.txt:{line}: {re.escape(word)}: {what}$"
    with pytest.raises(DeviseError, match=expected) as err:
        V.load_vectors(path)
    assert "\n" not in str(err.value)
    assert not list((home / "vectors").glob("*/words.json"))  # nothing cached


# ---------------------------------------------------------------- the sentence encoder (native Keras)

def test_minilm_encodes_any_phrase(home):
    enc = V.load_vectors("minilm")
    emb = V.embed_labels(["cat", "dog", "truck", "n02123045", "a zzqxw made of glass"], enc)
    assert emb.matrix.shape == (5, 384) and emb.dropped == [] and emb.matrix.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb.matrix, axis=1), 1, atol=1e-5)
    cat, dog, truck, tabby, _ = emb.matrix
    assert cat @ dog > cat @ truck
    # A synset is "name, a kind of <hypernym>"; a plain phrase is its own text.
    assert V.sentence_label_text("n02123045") == "tabby, a kind of domestic cat"
    np.testing.assert_allclose(tabby, enc.vector("tabby, a kind of domestic cat"), atol=1e-5)
    assert emb.source[3] == "sentence 'tabby, a kind of domestic cat'"
    assert V.sentence_label_text(" tiger cat ") == "tiger cat"
    # A label linked to a synset reads its hypernym too, so two senses of one name get two vectors.
    senses = V.embed_labels(["tiger cat", "tiger cat"], enc, synsets=["n02123159", "n02126465"])
    assert senses.matrix[0] @ senses.matrix[1] < 0.95
    missing = V.embed_labels(["cat", "n99999999", "  "], enc, drop_missing=True)
    assert missing.labels == ["cat"] and missing.dropped == ["n99999999", "  "]
