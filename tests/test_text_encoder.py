"""The native Keras all-MiniLM-L6-v2 against sentence-transformers' vectors, its tokenizer, and the encoding cache.

tests/data/minilm_reference.npz was written by scripts/make_minilm_reference.py (sentence-transformers 6.2
on torch 2.13, CPU): 1000 ImageNet class names, 200 WordNet "lemma: gloss" texts, 3 long texts (150, 300
and 600 words: beyond 128 and 256 word pieces) and tokenizer edge cases.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from devise.labels import vectors as V
from devise.errors import DeviseError
from devise.models.text_encoder import EncodingCache, TextEncoder, bucket_length, model_dir

FIXTURE = Path(__file__).parent / "data" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as data:
        texts = json.loads(data["texts_json"].tobytes().decode())
        return texts, data["vectors"], data["lengths"]


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder()


@pytest.fixture(scope="module")
def native(encoder, reference):
    return encoder.encode(reference[0])


@pytest.fixture
def home(tmp_path, monkeypatch):
    folder = tmp_path / "home"
    monkeypatch.setenv("DEVISE_HOME", str(folder))
    return folder


def test_native_vectors_match_sentence_transformers(native, reference):
    texts, ref, _ = reference
    assert len(texts) == 1215 and ref.shape == (1215, 384) and ref.dtype == np.float32
    assert native.shape == ref.shape and native.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(native, axis=1), 1, atol=1e-5)
    error = np.abs(native - ref).max(axis=1)
    assert error.max() < 1e-4, f"worst: {texts[int(error.argmax())][:60]!r} off by {error.max():.2e}"


def test_tokenizer_matches_the_reference_and_truncates_at_max_seq_length(encoder, native, reference):
    texts, ref, lengths = reference
    ids = encoder.tokenize(texts)
    np.testing.assert_array_equal([len(x) for x in ids], lengths)
    assert encoder.config.max_seq_length == 256 and lengths.max() == 256  # sentence_bert_config.json, not tokenizer.json's 128
    long = [i for i, t in enumerate(texts) if len(t.split()) >= 150]
    assert len(long) == 3 and 128 < len(ids[long[0]]) < 256  # past tokenizer.json's 128, not truncated
    assert all(len(ids[i]) == 256 and ids[i][-1] == 102 for i in long[1:])  # truncated: ..., [SEP]
    # past 256 word pieces nothing counts: 300 and 600 words give one vector, the reference's
    np.testing.assert_allclose(native[long[1]], native[long[2]], atol=1e-6)
    np.testing.assert_allclose(native[long[2]], ref[long[2]], atol=1e-4)
    assert np.abs(native[long[0]] - native[long[1]]).max() > 1e-3


def test_tokenizer_edge_cases(encoder, native, reference):
    texts, ref, _ = reference
    row = {t: i for i, t in enumerate(texts)}
    # The empty string is "[CLS] [SEP]", as in the reference (SentenceEncoder treats it as no label).
    assert encoder.tokenize([""]) == [[101, 102]] and encoder.tokenize([" "]) == [[101, 102]]
    np.testing.assert_allclose(native[row[""]], ref[row[""]], atol=1e-4)
    # uncased: lowercased and accents stripped; CJK split per character; an emoji is [UNK]
    assert encoder.tokenize(["CAT"]) == encoder.tokenize(["cat"])
    assert encoder.tokenizer.decode(encoder.tokenize(["naïve Größe"])[0]) == "naive große"
    cjk = encoder.tokenize(["日本語のテキスト"])[0]
    assert len(cjk) == 2 + 8 and 100 not in cjk
    assert 100 in encoder.tokenize(["🐱 cat face"])[0]  # [UNK]
    for text in ("café au lait", "naïve Größe", "日本語のテキスト", "🐱 cat face", "  tiger   cat  "):
        np.testing.assert_allclose(native[row[text]], ref[row[text]], atol=1e-4)
    with pytest.raises(DeviseError, match=r"^text 1 is a NoneType, not a string"):
        encoder.encode(["cat", None])
    assert encoder.encode([]).shape == (0, 384)


def test_batches_and_bucketed_lengths_do_not_change_vectors(encoder, native, reference):
    texts = reference[0]
    picks = [0, 5, 1003, 1100, 1200, 1212, 1214]  # short and long together, out of order
    small = TextEncoder(batch_size=3)
    np.testing.assert_allclose(small.encode([texts[i] for i in picks]), native[picks], atol=1e-5)
    assert [bucket_length(n) for n in (2, 8, 9, 25, 256)] == [4, 8, 12, 32, 256]


def test_semantics_survive(native, reference):
    texts = reference[0]
    row = {t: i for i, t in enumerate(texts)}
    cos = lambda a, b: float(native[row[a]] @ native[row[b]])  # noqa: E731
    assert cos("tabby cat", "Persian cat") > cos("tabby cat", "fire truck")
    assert cos("fire truck", "tow truck") > cos("fire truck", "Siamese cat")


def test_cache_hit_returns_identical_vectors_without_the_model(home, reference):
    texts = reference[0][1000:1040]
    first = V.SentenceEncoder()
    vecs = first.encode(texts)
    folder = home / "text-vectors" / f"minilm-{first.encoder.identity}"
    assert [p.suffix for p in folder.iterdir()] == [".npz"]  # one shard, no temporary files left
    second = V.SentenceEncoder()  # as a new process would: nothing in memory
    again = second.encode(texts)
    np.testing.assert_array_equal(again, vecs)
    assert second.encoder._model is None  # answered from the cache: the model was never built
    # half cached, half new: only the new ones are encoded, the result is the same as all at once
    mixed = texts[::2] + reference[0][1040:1044]
    out = second.encode(mixed)
    np.testing.assert_array_equal(out[:20], vecs[::2])
    np.testing.assert_allclose(out[20:], TextEncoder().encode(reference[0][1040:1044]), atol=1e-6)
    assert len(list(folder.glob("*.npz"))) == 2


def test_cache_shards_merge_and_stay_readable(tmp_path):
    cache = EncodingCache(tmp_path / "c")
    cache.MERGE_AT = 4
    rng = np.random.default_rng(0)
    texts = [f"text {i}" for i in range(60)]
    assert EncodingCache.key("text 7").endswith(b"\x00")  # numpy's bytes strings would lose this byte
    rows = rng.standard_normal((60, 8)).astype(np.float32)
    cache.add(texts[10:], rows[10:])  # a big shard (say, all WordNet): never rewritten by merges
    big = next((tmp_path / "c").glob("*.npz"))
    big_inode = big.stat().st_ino
    for i in range(0, 10, 2):  # small ones (say, one query each)
        cache.add(texts[i:i + 2], rows[i:i + 2])
    shards = sorted((tmp_path / "c").glob("*.npz"))
    assert len(shards) < 4 and big in shards and big.stat().st_ino == big_inode
    out, missing = EncodingCache(tmp_path / "c").lookup(texts + ["new"], 8)
    assert missing == [60]
    np.testing.assert_array_equal(out[:60], rows)


def test_model_files_and_errors(tmp_path):
    folder = model_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    bad = tmp_path / "model"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json", "sentence_bert_config.json"):
        (bad / name).write_bytes((folder / name).read_bytes())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    enc = TextEncoder(bad)
    with pytest.raises(DeviseError, match=r"model.safetensors: not a readable safetensors file"):
        enc.encode(["cat"])
    config = json.loads((folder / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(config, hidden_act="gelu_new")))
    with pytest.raises(DeviseError, match=r"config.json: only BERT with exact GELU"):
        TextEncoder(bad)
