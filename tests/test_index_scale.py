"""Shards (plan, resume, mismatch) and the index built from rows within a memory cap: the same results as
today's flat index on real images; a compressed IVF-PQ index on rows shaped like real embeddings, its
recall measured and stored, searched through load_index; adding a folder to it."""
import json
import shutil

import numpy as np
import pytest

from devise.data import shards
from devise.errors import DeviseError
from devise.serving.index_build import choose_kind, parse_memory
from devise.serving.search import build_index, load_index, search

GLOVE = "glove-6b-50d"


@pytest.fixture(scope="module")
def emoji_paths():
    from devise.data.datasets import load_dataset

    dataset = load_dataset("emoji")
    wanted = {dataset.classes.index(name) for name in ("cat", "dog", "guitar", "pizza")}
    return [p for p, label in zip(dataset.paths, dataset.labels) if int(label) in wanted][:24]


def test_shards_plan_resume_and_mismatch(tmp_path):
    folder = tmp_path / "shards"
    model = {"model": "synthetic", "vectors": "minilm", "dim": 4}
    paths = [f"/x/{i}.png" for i in range(25)]
    plan = shards.plan_shards(paths, model, folder, shard_rows=10)
    assert [s["rows"] for s in plan["shards"]] == [10, 10, 5] and shards.missing_shards(folder) == [0, 1, 2]
    shards.write_shard(folder, 1, paths[10:20], np.eye(4)[np.arange(10) % 4], np.ones(10, bool))
    with pytest.raises(DeviseError, match="2 of 3 shards not written"):
        shards.check_complete(folder)
    (folder / "shard-00002.npz").write_bytes(b"half a file")  # damaged: computed again, not read
    assert shards.plan_shards(paths, model, folder, shard_rows=10) == plan  # a rerun keeps the finished shard
    assert shards.missing_shards(folder) == [0, 2]
    with pytest.raises(DeviseError, match="plan wants 10 rows"):
        shards.write_shard(folder, 0, paths[:9], np.zeros((9, 4)), np.ones(9, bool))
    with pytest.raises(DeviseError, match="another job.*other images"):
        shards.plan_shards(paths[:-1], model, folder, shard_rows=10)
    with pytest.raises(DeviseError, match="another job.*model"):
        shards.plan_shards(paths, {**model, "model": "other"}, folder, shard_rows=10)


def test_index_from_shards_equals_flat_index(emoji_paths, tmp_path):
    """Real images, real model: embedded into shards in-process, indexed from them -> the same rows and
    the same search results as the index built from the images."""
    from devise.models.model import load

    direct = build_index(emoji_paths, out=tmp_path / "direct", progress=False, vectors=GLOVE)
    model = load("conse", GLOVE)
    folder = tmp_path / "shards"
    shards.embed_shards(emoji_paths, model, folder, shard_rows=10, progress=False)
    assert shards.missing_shards(folder) == [] and len(list(folder.glob("shard-*.npz"))) == 3
    from_shards = build_index(out=tmp_path / "from_shards", shards=folder, progress=False)
    assert from_shards.paths == direct.paths and from_shards.kind == "flat" and from_shards.model == "conse"
    np.testing.assert_allclose(from_shards.embeddings, direct.embeddings, atol=1e-5)
    for query in ("cat", "guitar"):
        assert search(from_shards, text=query, top_k=5) == search(direct, text=query, top_k=5)


def _real_like_rows(n, seed=0):
    """Rows drawn from a Gaussian with the spectrum of real ConSE/GloVe embeddings of emoji images."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((40, 50)) * np.linspace(2, 0.2, 50)  # 40 "classes" in 50-d
    x = base[rng.integers(0, 40, n)] + 0.35 * rng.standard_normal((n, 50))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_compressed_index_under_a_tiny_cap(tmp_path):
    """A shard folder of 6,000 rows with a 1 MB cap: IVF-PQ, recall measured and stored, searched via
    load_index; its exact neighbours found."""
    n, folder = 6000, tmp_path / "shards"
    vectors = _real_like_rows(n)
    paths = [str(tmp_path / f"img{i:05d}.png") for i in range(n)]
    shards.plan_shards(paths, {"model": "conse", "vectors": GLOVE, "dim": 50}, folder, shard_rows=2500)
    for k, first in enumerate(range(0, n, 2500)):
        shards.write_shard(folder, k, paths[first:first + 2500], vectors[first:first + 2500],
                           np.ones(len(vectors[first:first + 2500]), bool))
    index = build_index(out=tmp_path / "idx", shards=folder, memory_cap="1MB", progress=False)
    assert index.kind == "ivfpq" and len(index) == n
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["recall"]["recall@10"] >= 0.9 and not meta["recall"]["exact"] and meta["params"]["nprobe"] >= 1
    again = load_index(tmp_path / "idx")
    assert again.kind == "ivfpq" and again.recall == meta["recall"]
    assert isinstance(again.embeddings, np.memmap)  # not read into memory
    _, found = again.index.search(vectors[:20], 1)
    assert (found[:, 0] == np.arange(20)).mean() >= 0.9  # a row is its own nearest neighbour


def test_choose_kind_by_cap():
    assert parse_memory("2GB") == 2 << 30 and parse_memory("512 MiB") == 512 << 20 and parse_memory(None) is None
    with pytest.raises(DeviseError, match="memory cap"):
        parse_memory("lots")
    assert choose_kind(50_000, 384)[0] == "flat" and choose_kind(200_000, 384)[0] == "hnsw"  # no cap: as before
    assert choose_kind(1_000_000, 384, 2 << 30)[0] == "ivfpq"  # 1.5 GB of vectors > half of 2 GB
    assert choose_kind(100_000, 384, 2 << 30)[0] == "hnsw"
    with pytest.raises(DeviseError, match="too small"):
        choose_kind(1_000_000, 384, 1 << 20)


def test_adding_a_folder_to_a_compressed_index(emoji_paths, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, p in enumerate(emoji_paths[:12]):
        shutil.copy(p, folder / f"a{i}.png")
    out = tmp_path / "idx"
    first = build_index(folder, out=out, progress=False, vectors=GLOVE, memory_cap=2500)
    assert first.kind == "ivfpq" and len(first) == 12
    more = tmp_path / "more"
    more.mkdir()
    for i, p in enumerate(emoji_paths[12:18]):
        shutil.copy(p, more / f"b{i}.png")
    second = build_index([folder, more], out=out, progress=False, vectors=GLOVE, memory_cap=2500)
    assert len(second) == 18 and sorted(second.added) == sorted(str(more / f"b{i}.png") for i in range(6))
    assert second.kind == "ivfpq" and second.recall["recall@10"] > 0
    query = str(more / "b0.png")
    assert search(out, image=query, top_k=1)["results"][0]["image"] == query
