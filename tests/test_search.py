"""FAISS image index and search over real emoji images of the benchmark (ConSE, real backbone and GloVe)."""
import json
import shutil

import numpy as np
import pytest

from devise.errors import DeviseError
from devise.serving.search import build_index, load_index, search

CAT_LIKE = ("cat", "cat face", "black cat")
OTHERS = ("dog", "pizza", "guitar", "automobile", "house", "banana", "rocket")
GLOVE = "glove-6b-50d"  # ConSE's label space in these tests (an unknown word is an error only there)


@pytest.fixture(scope="module")
def emoji_subset():
    """{class name: [image paths]} for a few classes of the emoji benchmark, cat-like ones included."""
    from devise.data.datasets import load_dataset

    dataset = load_dataset("emoji")
    wanted = {dataset.classes.index(name): name for name in CAT_LIKE + OTHERS}
    subset = {}
    for path, label in zip(dataset.paths, dataset.labels):
        if int(label) in wanted:
            subset.setdefault(wanted[int(label)], []).append(path)
    return subset


@pytest.fixture(scope="module")
def emoji_index(emoji_subset, tmp_path_factory):
    paths = [p for paths in emoji_subset.values() for p in paths]
    return build_index(paths, out=tmp_path_factory.mktemp("idx") / "emoji.index", progress=False, vectors=GLOVE)


def _class_of(path, subset):
    return next(name for name, paths in subset.items() if path in paths)


def test_text_cat_returns_cat_like_emoji_first(emoji_index, emoji_subset):
    result = search(emoji_index, text="cat", top_k=5)
    assert result["query"] == "cat"
    classes = [_class_of(r["image"], emoji_subset) for r in result["results"]]
    assert all(c in CAT_LIKE for c in classes[:3]), classes
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1
    # multi-word queries are phrases; an unknown word is a clear error
    assert _class_of(search(emoji_index, text="musical instrument", top_k=1)["results"][0]["image"],
                     emoji_subset) == "guitar"
    with pytest.raises(DeviseError, match="qzxvbnmw"):
        search(emoji_index, text="qzxvbnmw")


def test_image_query_finds_itself_and_its_class(emoji_index, emoji_subset):
    query = emoji_subset["guitar"][0]
    result = search(emoji_index, image=query, top_k=3)
    assert result["results"][0]["image"] == query
    assert result["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(DeviseError, match="give exactly one query"):
        search(emoji_index, text="cat", image=query)


def test_index_is_reloaded_from_disk(emoji_index):
    again = load_index(emoji_index.folder)
    assert again.paths == emoji_index.paths and again.kind == "flat" and again.model == "conse"
    np.testing.assert_array_equal(again.embeddings, emoji_index.embeddings)


def test_adding_removing_and_unreadable_files(emoji_subset, emoji_index, tmp_path):
    folder = tmp_path / "collection"
    folder.mkdir()
    cats = emoji_subset["cat"][:3]
    for i, p in enumerate(cats):
        shutil.copy(p, folder / f"cat{i}.png")
    out = tmp_path / "my.index"
    first = build_index(folder, out=out, progress=False, vectors=GLOVE)
    assert len(first) == 3 and len(first.added) == 3

    (folder / "cat0.png").unlink()
    for i, p in enumerate(emoji_subset["guitar"][:2]):
        shutil.copy(p, folder / f"guitar{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.warns(UserWarning) as caught:
        second = build_index(folder, out=out, progress=False, vectors=GLOVE)
    assert len(caught) == 1, [str(w.message) for w in caught]  # one warning listing every problem
    message = str(caught[0].message)
    assert "cat0.png" in message and "broken.png" in message
    assert sorted(second.added) == sorted(str(folder / f"guitar{i}.png") for i in range(2))  # old ones not re-embedded
    assert second.removed == [str(folder / "cat0.png")]
    assert len(load_index(out)) == 4
    assert search(out, text="guitar", top_k=1)["results"][0]["image"].startswith(str(folder / "guitar"))
    # same embeddings as the big index for the same picture (batch composition never matters)
    row = second.paths.index(str(folder / "cat1.png"))
    np.testing.assert_allclose(second.embeddings[row],
                               emoji_index.embeddings[emoji_index.paths.index(cats[1])], atol=1e-5)
    with pytest.raises(DeviseError, match="built with model"):
        build_index(folder, model=str(tmp_path), out=out)


def test_approximate_index_gives_the_same_top_results(emoji_subset, emoji_index, tmp_path):
    paths = emoji_index.paths
    hnsw = build_index(paths, out=tmp_path / "hnsw.index", approx_threshold=1, progress=False, vectors=GLOVE)
    assert hnsw.kind == "hnsw" and load_index(hnsw.folder).kind == "hnsw"
    exact = [r["image"] for r in search(emoji_index, text="cat", top_k=5)["results"]]
    approx = [r["image"] for r in search(hnsw.folder, text="cat", top_k=5)["results"]]
    assert approx == exact


def test_cli_index_and_search(emoji_subset, tmp_path, capsys):
    from devise.cli import main

    folder = tmp_path / "pics"
    folder.mkdir()
    for name in ("cat", "dog", "guitar"):
        shutil.copy(emoji_subset[name][0], folder / f"{name.replace(' ', '_')}.png")
    out = tmp_path / "pics.index"
    assert main(["index", str(folder), "--out", str(out)]) == 0
    assert "3 images" in capsys.readouterr().out
    assert main(["search", str(out), "guitar", "--top", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["query"] == "guitar" and len(result["results"]) == 2
    assert result["results"][0]["image"] == str(folder / "guitar.png")
    assert set(result["results"][0]) == {"image", "score"}
    assert main(["search", str(out), "--image", str(folder / "dog.png"), "--top", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["image"] == str(folder / "dog.png")
    assert main(["search", str(out)]) == 2
    assert main(["search", str(tmp_path / "nothing"), "cat"]) == 2


def test_index_skips_unreadable_entries_with_one_warning(emoji_subset, tmp_path, capsys):
    """A broken link, a looping link and a FIFO beside real images: skipped and listed, never a traceback
    (a looping link used to abort Path.resolve(); opening the FIFO blocked forever)."""
    import os
    import signal

    from devise.cli import main

    folder = tmp_path / "messy"
    folder.mkdir()
    for name in ("cat", "guitar"):
        shutil.copy(emoji_subset[name][0], folder / f"{name}.png")
    (folder / "broken.png").symlink_to(folder / "gone.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    os.mkfifo(folder / "pipe.png")

    def fail(*_):
        raise AssertionError("index still running after 120 s: the FIFO was opened")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(120)
    try:
        with pytest.warns(UserWarning) as caught:
            index = build_index(folder, out=tmp_path / "messy.index", progress=False)
        assert main(["index", str(folder), "--out", str(tmp_path / "cli.index")]) == 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    for entry in (f"{folder / 'broken.png'}: broken symbolic link", f"{folder / 'loop.png'}: symbolic link loop",
                  f"{folder / 'pipe.png'}: a named pipe"):
        assert entry in messages[0]
    assert sorted(index.paths) == [str(folder / "cat.png"), str(folder / "guitar.png")]
    assert len(index.skipped) == 3
    assert "2 images" in capsys.readouterr().out


def test_index_out_that_is_a_file_fails_before_any_work(emoji_subset, tmp_path, capsys):
    from devise.cli import main

    taken = tmp_path / "taken.index"
    taken.write_text("an ordinary file")
    folder = tmp_path / "pics"
    folder.mkdir()
    shutil.copy(emoji_subset["cat"][0], folder / "cat.png")
    # checked before the model is even loaded: a model that does not exist is never reached
    with pytest.raises(DeviseError, match=r"taken\.index: exists and is not a folder"):
        build_index(folder, model=str(tmp_path / "no-such-run"), out=taken)
    with pytest.raises(DeviseError, match=r"inside\.index: cannot make the index folder: .*taken\.index is not a folder"):
        build_index(folder, out=taken / "inside.index")
    assert main(["index", str(folder), "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "taken.index: exists and is not a folder" in err
    assert taken.read_text() == "an ordinary file"


def test_an_index_records_the_model_it_was_built_with_whatever_the_cwd_holds(emoji_subset, tmp_path, monkeypatch):
    """The default model is the 'conse' preset even where a folder named 'conse' sits in the working
    directory (devise.load's rule); the index must record the model it actually embedded with."""
    (tmp_path / "conse").mkdir()
    monkeypatch.chdir(tmp_path)
    index = build_index(next(iter(emoji_subset.values()))[:4], out=tmp_path / "idx", progress=False)
    assert index.model == load_index(tmp_path / "idx").model == "conse"


def test_a_file_replaced_with_the_same_size_and_mtime_is_embedded_again(emoji_subset, tmp_path):
    """A rename over a file (an atomic save, rsync -t, cp -p) can keep its size and mtime: the inode
    still tells, so the index never keeps the old picture's embedding."""
    import os
    folder = tmp_path / "photos"
    folder.mkdir()
    cat, guitar = emoji_subset["cat"][0], emoji_subset["guitar"][0]
    big, small = sorted([cat, guitar], key=lambda p: os.path.getsize(p), reverse=True)
    shutil.copy(big, folder / "a.png")
    shutil.copy(big, folder / "b.png")
    out = tmp_path / "idx"
    build_index(folder, out=out, progress=False, vectors=GLOVE)
    target = folder / "a.png"
    before = os.stat(target)
    data = open(small, "rb").read()  # PNG readers ignore bytes after IEND: pad to the old size
    (tmp_path / "new.png").write_bytes(data + b"\0" * (before.st_size - len(data)))
    os.replace(tmp_path / "new.png", target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(target).st_size, os.stat(target).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    again = build_index(folder, out=out, progress=False, vectors=GLOVE)
    assert again.added == [str(target)]
    fresh = build_index([target], out=tmp_path / "fresh", progress=False, vectors=GLOVE)
    np.testing.assert_allclose(again.embeddings[again.paths.index(str(target))], fresh.embeddings[0], atol=1e-5)


def test_an_index_is_embedded_again_when_its_model_folder_is_saved_anew(emoji_subset, tmp_path):
    """Retraining a run into the same folder changes every embedding: no old row may be kept."""
    import dataclasses

    from devise.models.model import load
    folder = tmp_path / "run"
    conse = load("conse", vectors=GLOVE)
    conse.save(folder)
    paths = emoji_subset["cat"][:2] + emoji_subset["dog"][:2]
    first = build_index(paths, model=str(folder), out=tmp_path / "idx", progress=False)
    dataclasses.replace(conse, settings={**conse.settings, "T": 1}).save(folder)  # "retrained": another T
    with pytest.warns(UserWarning, match="every image embedded again .4.: not the same model folder files as when"):
        second = build_index(paths, model=str(folder), out=tmp_path / "idx", progress=False)
    assert sorted(second.added) == sorted(first.paths)
    fresh = build_index(paths, model=str(folder), out=tmp_path / "fresh", progress=False)
    np.testing.assert_allclose(second.embeddings, fresh.embeddings, atol=1e-5)
    assert not np.allclose(first.embeddings, fresh.embeddings, atol=1e-3)


def test_an_index_refuses_another_label_space(emoji_subset, tmp_path):
    """Adding images with another --vectors would put two spaces (50-d and 384-d) in one index."""
    paths = emoji_subset["cat"][:2]
    build_index(paths, out=tmp_path / "idx", progress=False, vectors=GLOVE)
    with pytest.raises(DeviseError, match="built with vectors 'glove-6b-50d', not 'minilm'"):
        build_index(paths + emoji_subset["dog"][:1], out=tmp_path / "idx", progress=False)
