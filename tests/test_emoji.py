"""The built-in emoji benchmark, built once into the data home by prepare_assets() (a few minutes the first
time; CI runs `devise setup-assets` before the tests, so here it is normally already built)."""
import json
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from devise.data.datasets import load_dataset, prepare_assets, validation_split, zero_shot_split
from devise.data.emoji import MIN_STYLES, STYLES, emoji_dir, emoji_manifest, frame_on_white
from devise.labels.wordnet import load_wordnet


@pytest.fixture(scope="session")
def emoji_dataset():
    prepare_assets()
    return load_dataset("emoji")


def test_prepare_assets_is_quick_when_built(emoji_dataset):
    start = time.perf_counter()
    prepare_assets()
    assert time.perf_counter() - start < 1.0


def test_classes_styles_and_counts(emoji_dataset):
    ds = emoji_dataset
    assert 800 <= ds.num_classes <= 900
    assert set(ds.styles.tolist()) == set(STYLES) and len(STYLES) == 6
    assert not {"apple", "facebook"} & set(ds.styles.tolist())
    per_class = np.bincount(ds.labels, minlength=ds.num_classes)
    assert per_class.min() >= MIN_STYLES and per_class.max() <= 6
    assert len(set(ds.classes)) == ds.num_classes
    for style in ("google", "twitter"):  # emoji-datasource draws every object emoji
        assert (ds.styles == style).sum() == ds.num_classes
    manifest = emoji_manifest()
    assert manifest["classes"] == ds.num_classes and manifest["images"] == len(ds)
    assert manifest["images_per_style"] == dict(Counter(ds.styles.tolist()))
    assert all(not ("apple" in p or "facebook" in p) for p in manifest["packages"])


def test_files_are_framed_rgb(emoji_dataset):
    ds = emoji_dataset
    for i in np.random.default_rng(0).choice(len(ds), 12, replace=False):
        with Image.open(ds.paths[i]) as im:
            assert im.size == (224, 224) and im.mode == "RGB"
            pixels = np.asarray(im)
        assert (pixels[0] == 255).all() and (pixels[:, 0] == 255).all()  # white margin
        assert (pixels < 250).any()  # something drawn


def test_names_and_wordnet_links(emoji_dataset):
    ds, wn = emoji_dataset, load_wordnet()
    by_name = dict(zip(ds.classes, range(ds.num_classes)))
    for name in ("water buffalo", "cat", "dog", "hot pepper", "tiger"):
        assert name in by_name, name
    assert ds.wnids[by_name["cat"]] == "n02121620" == wn.synsets_for("cat")[0]  # cat.n.01, the feline
    assert ds.match[by_name["dog"]] == "exact" and "Canis familiaris" in wn.lemmas(ds.wnids[by_name["dog"]])
    assert "Panthera tigris" in wn.lemmas(ds.wnids[by_name["tiger"]])
    assert ds.match[by_name["cow face"]] == "head" and ds.wnids[by_name["cow face"]] in wn.synsets_for("cow")
    counts = Counter(ds.match)
    assert set(counts) <= {"exact", "head", "none"} and counts["none"] < 0.1 * ds.num_classes
    for wnid, how in zip(ds.wnids, ds.match):
        assert (wnid is None) == (how == "none") and (wnid is None or wnid in wn)
    classes = json.loads((emoji_dir() / "classes.json").read_text())
    assert [c["name"] for c in classes] == ds.classes


def test_split_deterministic_and_disjoint(emoji_dataset):
    ds = emoji_dataset
    a, b = zero_shot_split(ds, seed=0), zero_shot_split(ds, seed=0)
    assert np.array_equal(a.unseen_classes, b.unseen_classes) and np.array_equal(a.seen_test, b.seen_test)
    assert abs(len(a.unseen_classes) - 0.25 * ds.num_classes) <= 1
    assert not set(a.seen_classes) & set(a.unseen_classes)
    assert not set(a.train) & set(a.seen_test) and not set(a.train) & set(a.unseen)
    assert len(a.train) + len(a.seen_test) + len(a.unseen) == len(ds)
    assert set(ds.styles[a.seen_test]) == {"twitter"} and len(a.seen_test) == len(a.seen_classes)
    assert set(np.unique(ds.labels[a.train])) == set(a.seen_classes)  # every seen class keeps >= 3 styles
    v = validation_split(a, seed=0)
    assert not set(v.val_classes) & set(v.train_classes) and set(v.val_classes) <= set(a.seen_classes)


def test_frame_on_white_centres_and_fills():
    drawing = Image.new("RGBA", (300, 100), (0, 0, 0, 0))
    drawing.paste((200, 0, 0, 255), (10, 10, 110, 60))  # a 100x50 red box off-centre
    framed = np.asarray(frame_on_white(drawing))
    red = np.argwhere(framed[..., 1] < 128)
    (top, left), (bottom, right) = red.min(0), red.max(0)
    assert abs((right - left + 1) - round(0.85 * 224)) <= 2 and abs(left - (223 - right)) <= 1
    assert frame_on_white(Image.new("RGBA", (10, 10))) is None
