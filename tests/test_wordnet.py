"""WordNet graph: the real WordNet 3.0 noun database (Debian wordnet-base) and a toy one built from dicts."""
import pytest

from devise.assets import imagenet1k_classes
from devise.errors import DeviseError
from devise.labels.wordnet import WordNet, hop_distances, load_wordnet, zero_shot_label_sets

TABBY, TIGER_CAT, CAT, DOMESTIC_CAT = "n02123045", "n02123159", "n02121620", "n02121808"
PERSIAN, LION, TIGER, PARIS = "n02123394", "n02129165", "n02129604", "n08932568"


@pytest.fixture(scope="module")
def wn():
    return load_wordnet()


def test_real_wordnet_synsets_and_lemmas(wn):
    assert len(wn.all_noun_ids()) == 82115
    assert wn.name(TABBY) == "tabby"
    assert wn.lemmas(TABBY) == ["tabby", "tabby cat"]
    assert wn.gloss(TABBY).startswith("a cat with a grey or tawny coat")
    assert wn.hypernyms(TABBY) == [DOMESTIC_CAT]
    assert TABBY in wn.hyponyms(DOMESTIC_CAT) and TIGER_CAT in wn.hyponyms(DOMESTIC_CAT)
    # sense order: the feline is cat's first sense; lookups ignore case, spaces and underscores
    assert wn.synsets_for("cat")[0] == CAT
    assert wn.synsets_for("Tabby Cat") == wn.synsets_for("tabby_cat") == [TABBY]
    assert wn.synsets_for("no such word xyz") == []
    # every ImageNet-1K id is a WordNet 3.0 noun synset
    assert all(c["wnid"] in wn for c in imagenet1k_classes())


def test_instance_edges_are_included_unless_excluded(wn):
    assert PARIS in wn.synsets_for("paris")
    city = wn.hypernyms(PARIS)
    assert city and wn.name(city[0]) == "national capital"
    assert wn.hypernyms(PARIS, instances=False) == []
    assert PARIS in wn.hyponyms(city[0]) and PARIS not in wn.hyponyms(city[0], instances=False)
    assert hop_distances([PARIS], 1, wn)[city[0]] == 1
    assert city[0] not in hop_distances([PARIS], 1, wn, instances=False)


def test_hop_distances_around_imagenet_cats(wn):
    d = hop_distances([TIGER_CAT], 5, wn)
    assert d[TIGER_CAT] == 0 and d[DOMESTIC_CAT] == 1
    assert d[TABBY] == 2 and d[PERSIAN] == 2  # siblings: up to domestic cat, down again
    assert d[CAT] == 2 and d[LION] == 5 and d[TIGER] == 5
    assert max(d.values()) == 5
    # direction does not matter: the distance is symmetric
    assert hop_distances([LION], 5, wn)[TIGER_CAT] == 5
    with pytest.raises(DeviseError, match="n99999999"):
        hop_distances(["n99999999"], 2, wn)


def test_zero_shot_label_sets_and_plus_training_variant(wn):
    candidates = [TABBY, PERSIAN, LION, TIGER_CAT, TIGER, "n99999999"]
    sets = zero_shot_label_sets([TIGER_CAT, None], candidates, hops=(2, 3, 5), wordnet=wn)
    assert sets[2] == [TABBY, PERSIAN] and sets[3] == [TABBY, PERSIAN]
    assert sets[5] == [TABBY, PERSIAN, LION, TIGER]  # the training label itself is left out
    plus = zero_shot_label_sets([TIGER_CAT], candidates, hops=(2,), include_training=True, wordnet=wn)
    assert plus[2] == [TABBY, PERSIAN, TIGER_CAT]


def test_zero_shot_sets_for_imagenet_1k_grow_with_hops(wn):
    training = [c["wnid"] for c in imagenet1k_classes()]
    universe = wn.all_noun_ids()
    sets = zero_shot_label_sets(training, universe, hops=(1, 2, 3), wordnet=wn)
    assert 0 < len(sets[1]) < len(sets[2]) < len(sets[3])
    assert set(sets[1]) <= set(sets[2]) <= set(sets[3])
    assert not set(sets[2]) & set(training)
    assert TABBY not in sets[2] and DOMESTIC_CAT in sets[1]


def test_toy_wordnet_from_plain_dicts():
    toy = WordNet(synsets={"r": ["root"], "a": ["Animal_kind"], "b": ["bird", "animal kind"], "i": ["Tweety"]},
                  hypernyms={"a": ["r"], "b": ["r"]}, instance_hypernyms={"i": ["b"]},
                  glosses={"a": "an animal"})
    assert toy.name("a") == "Animal kind" and toy.gloss("a") == "an animal" and toy.gloss("b") == ""
    assert toy.synsets_for("animal KIND") == ["a", "b"]
    assert toy.hyponyms("r") == ["a", "b"] and toy.hyponyms("b") == ["i"] and toy.hyponyms("b", instances=False) == []
    assert hop_distances(["a"], 3, toy) == {"a": 0, "r": 1, "b": 2, "i": 3}
    with pytest.raises(DeviseError, match="'zz'"):
        WordNet(synsets={"a": ["x"]}, hypernyms={"a": ["zz"]})


def test_missing_wordnet_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(DeviseError, match="data.noun"):
        load_wordnet(tmp_path)


def test_parse_cache_is_used(tmp_path, monkeypatch):
    """The pickled parse lands in the data home and a second load reads it back to the same graph."""
    import devise.labels.wordnet as wordnet_module
    monkeypatch.setenv("DEVISE_HOME", str(tmp_path))
    wordnet_module._load.cache_clear()
    try:
        first = load_wordnet()
        assert list((tmp_path / "wordnet").glob("wn*.pkl"))
        wordnet_module._load.cache_clear()
        second = load_wordnet()
        assert second.lemmas(TABBY) == first.lemmas(TABBY) and second.synsets_for("cat") == first.synsets_for("cat")
    finally:
        wordnet_module._load.cache_clear()
