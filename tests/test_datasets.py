"""Class-per-folder datasets, WordNet matching of class names and the seeded zero-shot splits (real WordNet)."""
import shutil

import numpy as np
import pytest

from devise.data import datasets
from devise.data.datasets import (ImageDataset, load_dataset, match_class_name, validation_split, wordnet_lookup,
                             zero_shot_split)
from devise.errors import DeviseError
from devise.labels.wordnet import load_wordnet


@pytest.fixture(scope="module")
def wordnet():
    return load_wordnet()


def _tree(root, layout, photos):
    """Write a folder tree: {relative class folder: number of photos}."""
    k = 0
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            src = photos[k % len(photos)]
            shutil.copy(src, root / folder / f"img{k}{src.suffix}")
            k += 1
    return root


def test_folder_names_phrase_underscore_and_wnid(photo_folder, wordnet):
    ds = load_dataset(photo_folder)
    assert ds.classes == ["cat", "tabby", "water buffalo"]  # folders sorted: cat, n02123045, water buffalo
    assert ds.wnids[1] == "n02123045" and ds.match[1] == "wnid"
    assert ds.wnids[0] == wordnet.synsets_for("cat")[0] and ds.match[0] == "exact"
    assert ds.match[2] == "exact" and "water buffalo" in wordnet.lemmas(ds.wnids[2])
    assert len(ds) == 12 and ds.labels.dtype == np.int32 and np.bincount(ds.labels).tolist() == [4, 4, 4]
    assert ds.styles is None and ds.splits is None


def test_split_subfolders_and_underscores(tmp_path, foolbox_photos):
    root = _tree(tmp_path / "data", {"train/tabby_cat": 3, "train/water_buffalo": 2, "val/tabby_cat": 1,
                                     "test/water_buffalo": 2, "test/tabby_cat": 1}, foolbox_photos)
    ds = load_dataset(root)
    assert ds.classes == ["tabby cat", "water buffalo"]
    assert ds.match == ["exact", "exact"]
    assert sorted(ds.splits.tolist()) == ["test"] * 3 + ["train"] * 5 + ["val"]
    # the train/val/test level is a split, never a class
    assert all(p.split("/")[-3] in ("train", "val", "test") for p in ds.paths)
    split = zero_shot_split(ds, seed=0, unseen_fraction=0.5)
    assert set(ds.splits[split.seen_test]) == {"test"}


def test_head_noun_and_no_match(wordnet):
    lookup = wordnet_lookup(wordnet=wordnet)
    assert match_class_name("cow face", lookup) == (wordnet.synsets_for("cow")[0], "head")
    wnid, how = match_class_name("glass of milk", lookup)
    assert how == "head" and "glass" in [l.lower() for l in wordnet.lemmas(wnid)]
    wnid, how = match_class_name("shiny tabby cat", lookup)
    assert (wnid, how) == ("n02123045", "head")  # longest matching tail: "tabby cat"
    assert match_class_name("zorblax quuxle", lookup) == (None, "none")
    # a physical sense is preferred over a person: tiger the animal, not "a fierce person"
    tiger, _ = match_class_name("tiger", lookup)
    assert "Panthera tigris" in wordnet.lemmas(tiger)


def test_missing_folder_error(tmp_path):
    with pytest.raises(DeviseError, match="no such folder"):
        load_dataset(tmp_path / "nope")


def test_registry_names_datasets_and_their_defaults(tmp_path, monkeypatch):
    """Built-in datasets register themselves on `import devise`; datasets.py names none of them."""
    assert "emoji" in datasets.list_datasets() and datasets.default_holdout_unseen("emoji") == 0.25
    assert datasets.default_holdout_unseen(str(tmp_path)) == 0.0  # a folder trains on all its classes
    assert "emoji" not in open(datasets.__file__).read()
    tiny = ImageDataset("tiny", str(tmp_path), [], np.zeros(0, np.int32), [], [])
    built = []
    monkeypatch.setattr(datasets, "DATASETS", dict(datasets.DATASETS))  # registered for this test only
    datasets.register_dataset("tiny", lambda: tiny, prepare=lambda: built.append(1), holdout_unseen=0.5)
    assert load_dataset("tiny") is tiny and datasets.default_holdout_unseen("tiny") == 0.5
    monkeypatch.setattr(datasets, "DATASETS", {"tiny": datasets.DATASETS["tiny"]})
    datasets.prepare_assets()
    assert built == [1]
    with pytest.raises(DeviseError, match="expected 'tiny' or a folder"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DeviseError, match="holdout_unseen=1"):
        datasets.register_dataset("bad", lambda: tiny, holdout_unseen=1)


def test_empty_class_folder_error_names_it(tmp_path, foolbox_photos):
    root = _tree(tmp_path / "data", {"cat": 2}, foolbox_photos)
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DeviseError, match=r"dog: class folder holds no image files") as err:
        load_dataset(root)
    assert "\n" not in str(err.value)


def test_no_class_folders_error(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    with pytest.raises(DeviseError, match="no class sub-folders"):
        load_dataset(tmp_path / "flat")


def test_bad_wnid_folder_error(tmp_path, foolbox_photos):
    root = _tree(tmp_path / "data", {"n99999999": 1}, foolbox_photos)
    with pytest.raises(DeviseError, match="n99999999"):
        load_dataset(root)


def test_corrupt_file_is_listed(photo_folder):
    bad = photo_folder / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    ds = load_dataset(photo_folder)
    assert str(bad) in ds.paths  # discovered by suffix; the feature extractor skips it with a warning


def _toy(n_classes=20, styles=("a", "b", "c", "twitter")):
    labels = np.repeat(np.arange(n_classes), len(styles)).astype(np.int32)
    return ImageDataset(name="toy", root="/", paths=[f"{i}.png" for i in range(len(labels))], labels=labels,
                        classes=[f"c{i}" for i in range(n_classes)], wnids=[None] * n_classes,
                        styles=np.array(list(styles) * n_classes), match=["none"] * n_classes)


def test_zero_shot_split_seeded_disjoint_and_complete():
    ds = _toy()
    a, b = zero_shot_split(ds, seed=3), zero_shot_split(ds, seed=3)
    assert np.array_equal(a.unseen_classes, b.unseen_classes) and np.array_equal(a.train, b.train)
    assert not np.array_equal(a.unseen_classes, zero_shot_split(ds, seed=4).unseen_classes)
    assert len(a.unseen_classes) == 5 and len(a.seen_classes) == 15
    assert not set(a.seen_classes) & set(a.unseen_classes)
    parts = [set(a.train), set(a.seen_test), set(a.unseen)]
    assert sum(map(len, parts)) == len(ds) and set.union(*parts) == set(range(len(ds)))
    assert set(ds.styles[a.seen_test]) == {"twitter"} and "twitter" not in set(ds.styles[a.train])
    assert set(ds.labels[a.unseen]) == set(a.unseen_classes)
    with pytest.raises(DeviseError, match="not a style"):
        zero_shot_split(ds, test_style="apple")


def test_validation_split_carves_seen_classes():
    split = zero_shot_split(_toy(), seed=0)
    v = validation_split(split, seed=0)
    assert len(v.val_classes) == 3 and len(v.train_classes) == 12
    assert set(v.val_classes) | set(v.train_classes) == set(split.seen_classes)
    assert sorted(np.concatenate([v.train, v.val]).tolist()) == sorted(split.train.tolist())
    assert set(split.labels[v.val]) == set(v.val_classes)
    assert np.array_equal(validation_split(split, seed=0).val_classes, v.val_classes)


def test_style_less_folder_split_holds_out_images(photo_folder):
    ds = load_dataset(photo_folder)
    split = zero_shot_split(ds, seed=0, unseen_fraction=0.34)
    assert len(split.unseen_classes) == 1 and len(split.seen_test) == 2  # 20% of each seen class's 4 images
    assert not set(split.train) & set(split.seen_test)


def test_unreadable_entries_are_skipped_with_one_warning(photo_folder):
    """Broken and looping links and a FIFO in class folders (as for `devise train`/`features`): left out and
    listed in one warning; before, they were listed as images and the FIFO blocked the decoder."""
    import os

    (photo_folder / "cat" / "broken.jpg").symlink_to(photo_folder / "gone.jpg")
    (photo_folder / "cat" / "loop.jpg").symlink_to(photo_folder / "cat" / "loop.jpg")
    os.mkfifo(photo_folder / "n02123045" / "pipe.jpg")
    with pytest.warns(UserWarning) as caught:
        ds = load_dataset(photo_folder)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    for entry in (f"{photo_folder / 'cat' / 'broken.jpg'}: broken symbolic link",
                  f"{photo_folder / 'cat' / 'loop.jpg'}: symbolic link loop",
                  f"{photo_folder / 'n02123045' / 'pipe.jpg'}: a named pipe"):
        assert entry in messages[0]
    assert len(ds.paths) == 12 and not any(p.endswith(("broken.jpg", "loop.jpg", "pipe.jpg")) for p in ds.paths)
    # a class folder with nothing readable in it: one line saying why
    shutil.rmtree(photo_folder / "cat")
    (photo_folder / "cat").mkdir()
    os.mkfifo(photo_folder / "cat" / "only.jpg")
    with pytest.raises(DeviseError, match=r"cat: class folder holds no image files \(skipped: .*only\.jpg: a named pipe"):
        load_dataset(photo_folder)
