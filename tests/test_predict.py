"""Open-vocabulary prediction on real photos with the real backbone, GloVe and WordNet (no mocks)."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from devise.errors import DeviseError
from devise.data.images import expand_image_paths
from devise.models.model import load
from devise.serving.predict import predict
from devise.evaluation.ranking import label_statistics, rank_labels, score_labels
from devise.labels.vocabulary import load_vocabulary


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """chelsea (a tabby cat) and coffee (an espresso) from skimage, saved as JPEG."""
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage.data.chelsea()).save(folder / "chelsea.jpg", quality=95)
    Image.fromarray(skimage.data.coffee()).save(folder / "coffee.jpg", quality=95)
    return folder


def _labels(result):
    return [p["label"] for p in result["predictions"]]


def test_chelsea_gets_a_cat_label_in_the_top5_with_the_defaults(photos):
    [result] = predict([photos / "chelsea.jpg"])
    assert result["image"] == str(photos / "chelsea.jpg")
    preds = result["predictions"]
    assert len(preds) == 5
    assert any("cat" in p["label"].split() for p in preds), preds
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True)
    # wordnet vocabulary: every prediction is a WordNet noun synset, the label its first lemma
    from devise.labels.wordnet import load_wordnet
    wordnet = load_wordnet()
    assert all(wordnet.name(p["synset"]) == p["label"] for p in preds)


def test_folder_is_predicted_in_batches_and_matches_single_images(photos, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        (folder / name).write_bytes((photos / name).read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        results = predict([folder], vocab="imagenet1k", top_k=3)
    assert [r["image"] for r in results] == [str(folder / "chelsea.jpg"), str(folder / "coffee.jpg")]
    assert results[1]["predictions"][0]["label"] == "espresso"
    # padding the batch never changes an image's answer
    [alone] = predict([folder / "coffee.jpg"], vocab="imagenet1k", top_k=3)
    np.testing.assert_allclose([p["score"] for p in alone["predictions"]],
                               [p["score"] for p in results[1]["predictions"]], atol=1e-5)


def test_label_file_vocabulary(photos, tmp_path):
    vocab = tmp_path / "labels.txt"
    vocab.write_text("# my labels\ncat\ndog\ncoffee cup\n\ncar\nn02123045\n")
    results = predict([photos / "chelsea.jpg", photos / "coffee.jpg"], vocab=vocab, top_k=5)
    chelsea, coffee = results
    assert chelsea["predictions"][0]["label"] in ("cat", "tabby")
    assert coffee["predictions"][0]["label"] == "coffee cup"
    synsets = {p["label"]: p["synset"] for p in chelsea["predictions"]}
    assert synsets["cat"] == "n02121620"  # a word's synset: its most frequent noun sense
    assert synsets["tabby"] == "n02123045"  # a WordNet id keeps its own synset
    assert len(chelsea["predictions"]) == 5


def test_label_file_with_unknown_words_is_an_error(photos, tmp_path):
    vocab = tmp_path / "labels.txt"
    vocab.write_text("cat\nqzxvbnmw\n")
    with pytest.raises(DeviseError, match="qzxvbnmw"):  # word vectors have no vector for it
        predict([photos / "chelsea.jpg"], model=load("conse", vectors="glove-6b-50d"), vocab=vocab)


def test_default_wordnet_vocabulary_is_every_noun_synset_and_senses_differ():
    vocab = load_vocabulary("wordnet")  # the sentence encoder: every synset has a vector
    assert len(vocab) == 82_115 and len(vocab.matrix) > 80_000  # a term per distinct label text
    tiger_cats = [vocab.matrix[vocab.entry_term[vocab.synsets.index(w)]] for w in ("n02123159", "n02126465")]
    assert tiger_cats[0] @ tiger_cats[1] < 0.95  # the tabby and the wild cat are two labels, not one


def test_wordnet_vocabulary_expands_terms_to_synsets_in_sense_order():
    vocab = load_vocabulary("wordnet", "glove-6b-50d")  # word vectors: senses of one word share a term
    # every synset has a vector (a lemma's, else its nearest hypernym's); senses of one word share a term
    assert len(vocab) == 82_115 and len(vocab.matrix) < 60_000
    np.testing.assert_allclose(np.linalg.norm(vocab.matrix, axis=1), 1, atol=1e-5)
    # a score row that puts one term first: its synsets come out first, most frequent sense first
    term = vocab.entry_term[vocab.synsets.index("n02121620")]  # cat.n.01
    scores = np.zeros((1, len(vocab.matrix)), np.float32)
    scores[0, term] = 1.0
    top = rank_labels(scores, vocab, 3)[0]
    members = [vocab.synsets[e] for e in np.flatnonzero(vocab.entry_term == term)]
    assert [p["synset"] for p in top[:len(members)]] == members[:3]
    assert top[0]["synset"] == "n02121620" and top[0]["score"] == 1.0


def test_hubness_statistics_and_corrections(photos, foolbox_photos):
    vocab = load_vocabulary("imagenet1k")
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(30, vocab.matrix.shape[1])).astype(np.float32)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    knn, mean = label_statistics(reference, vocab.matrix, k=10, chunk=100)
    sims = reference @ vocab.matrix.T
    np.testing.assert_allclose(knn, np.sort(sims, axis=0)[-10:].mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(mean, sims.mean(axis=0), atol=1e-5)
    queries = reference[:3]
    plain = score_labels(queries, vocab)
    np.testing.assert_allclose(score_labels(queries, vocab, "csls", reference), 2 * plain - knn, atol=1e-5)
    np.testing.assert_allclose(score_labels(queries, vocab, "center", reference), plain - mean, atol=1e-5)
    with pytest.raises(DeviseError, match="at least 20 reference images"):
        score_labels(queries, vocab, "csls")
    with pytest.raises(DeviseError, match="hubness"):
        score_labels(queries, vocab, "zscore")
    # on real photos: the query batch is the reference; chelsea stays a cat
    paths = [photos / "chelsea.jpg"] + list(foolbox_photos)
    results = predict(paths, vocab="imagenet1k", hubness="csls", top_k=5)
    assert any("cat" in p["label"] for p in results[0]["predictions"])


def test_bad_inputs():
    with pytest.raises(DeviseError, match="no such file"):
        expand_image_paths(["/nonexistent/x.jpg"])
    with pytest.raises(DeviseError, match="vocabulary"):
        load_vocabulary("not-a-vocab")
    with pytest.raises(DeviseError, match="run folder"):
        predict([__file__], model="/no/run")


def test_cli_predict_json(photos, capsys):
    from devise.cli import main

    assert main(["predict", str(photos / "chelsea.jpg"), str(photos / "coffee.jpg"), "--json", "--top", "3",
                 "--vocab", "imagenet1k"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    objects = [json.loads(line) for line in lines]
    assert [o["image"] for o in objects] == [str(photos / "chelsea.jpg"), str(photos / "coffee.jpg")]
    assert all(set(p) == {"label", "synset", "score", "probability"} for o in objects for p in o["predictions"])
    top = objects[1]["predictions"][0]
    assert top == {"label": "espresso", "synset": "n07920052", "score": top["score"], "probability": top["probability"]}
    assert objects[1]["answer"] in ("espresso", "unknown") and 0 <= objects[1]["min_confidence"] <= 1
    assert main(["predict", str(photos / "chelsea.jpg")]) == 0
    assert "chelsea.jpg" in capsys.readouterr().out
    assert main(["predict", "/nonexistent.jpg"]) == 2


def test_random_control_run_refuses_open_vocabulary_prediction(foolbox_photos, tmp_path):
    """The random-embedding control's scores against real word vectors mean nothing: a clear error."""
    from devise.data.features import extract_features
    from devise.training.train import train
    from devise.labels.vectors import embed_labels, load_vectors

    names = ["cat", "dog", "cup"]
    fs = extract_features(foolbox_photos[:6], progress=False)
    vectors = embed_labels(names, load_vectors("glove-6b-50d")).matrix
    train("random", np.asarray(fs.features), np.arange(6) % 3, names, vectors, epochs=1, verbose=0,
          out_dir=tmp_path / "random", backbone_name="efficientnet_lite0", vectors_spec="glove-6b-50d")
    with pytest.raises(DeviseError, match="random-embedding control run cannot name"):
        predict([foolbox_photos[0]], model=tmp_path / "random")


def _folder_with_unreadable_entries(root, photo):
    """A real photo beside a broken link, a looping link and a FIFO, all named like images (as root,
    chmod stops nothing, so no permission case). Opening the FIFO would block: callers run under an alarm."""
    root.mkdir()
    Image.open(photo).save(root / "chelsea.jpg")
    (root / "broken.jpg").symlink_to(root / "gone.jpg")
    (root / "loop.png").symlink_to(root / "loop.png")
    os.mkfifo(root / "pipe.jpg")
    return root


def _one_skip_warning(caught, folder):
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    for name, why in [("broken.jpg", "broken symbolic link"), ("loop.png", "symbolic link loop"),
                      ("pipe.jpg", "a named pipe")]:
        assert f"{folder / name}: {why}" in messages[0], messages[0]


def test_predict_and_classify_skip_unreadable_entries_with_one_warning(photos, tmp_path, fail_after):
    from devise.models.classify import classify

    folder = _folder_with_unreadable_entries(tmp_path / "messy", photos / "chelsea.jpg")
    with fail_after(120), pytest.warns(UserWarning) as caught:
        [result] = predict(folder, vocab="imagenet1k")
    _one_skip_warning(caught, folder)
    assert result["image"] == str(folder / "chelsea.jpg") and "cat" in " ".join(_labels(result))

    # classify takes folders like predict, by the same walker
    with fail_after(120), pytest.warns(UserWarning) as caught:
        [result] = classify([folder], top_k=3)
    _one_skip_warning(caught, folder)
    assert result["image"] == str(folder / "chelsea.jpg")
    assert result["predictions"][0]["synset"] in ("n02124075", "n02123045", "n02123159")  # Egyptian / tabby / tiger cat
    # nothing readable: one line naming what was skipped
    with pytest.raises(DeviseError, match=r"no image files to classify in: .*pipe\.jpg: a named pipe"):
        classify([folder / "pipe.jpg", folder / "loop.png"])


def test_cli_classify_a_folder(photos, tmp_path, capsys, fail_after):
    from devise.cli import main

    folder = _folder_with_unreadable_entries(tmp_path / "messy", photos / "chelsea.jpg")
    shutil.copy(photos / "coffee.jpg", folder / "coffee.jpg")
    with fail_after(120):
        assert main(["classify", str(folder), "--json", "--top", "1"]) == 0
    out, err = capsys.readouterr()
    objects = [json.loads(line) for line in out.strip().splitlines()]
    assert err.count("skipped 3") == 1 and "pipe.jpg: a named pipe" in err
    assert [o["image"] for o in objects] == [str(folder / "chelsea.jpg"), str(folder / "coffee.jpg")]
    assert objects[1]["predictions"][0]["label"] == "espresso"
