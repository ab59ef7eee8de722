"""ConSE: the convex combination against numpy, and zero-shot with the real ImageNet-1K classifier."""
import numpy as np
import pytest

import devise  # noqa: F401
from devise.models.conse import conse_embed, conse_from_logits, imagenet1k_class_vectors, softmax
from devise.errors import DeviseError


def test_conse_embed_matches_the_formula():
    rng = np.random.default_rng(0)
    probs = softmax(rng.standard_normal((6, 20)) * 3)
    vectors = rng.standard_normal((20, 8))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for T in (1, 3, 10, 20):
        expected = []
        for p in probs:
            top = np.argsort(-p)[:T]
            f = (p[top, None] * unit[top]).sum(0) / p[top].sum()          # (1/Z) sum p(c|x) s(c)
            expected.append(f / np.linalg.norm(f))
        np.testing.assert_allclose(conse_embed(probs, vectors, T), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(conse_embed(probs, vectors, 1), unit[probs.argmax(1)], rtol=1e-5, atol=1e-6)


def test_conse_bad_shapes():
    with pytest.raises(DeviseError, match="do not match"):
        conse_embed(np.ones((2, 3)), np.ones((4, 5)))
    with pytest.raises(DeviseError, match="T must be"):
        conse_embed(np.ones((2, 3)), np.ones((3, 5)), T=0)


@pytest.fixture(scope="module")
def glove():
    from devise.labels.vectors import load_vectors
    return load_vectors("glove-6b-50d")


def test_imagenet_conse_zero_shot_on_real_photos(glove):
    """The packaged ImageNet-1K classifier + GloVe: Chelsea the cat lands nearest 'cat', the coffee cup
    nearest 'coffee', among labels ConSE was never given as classes."""
    from skimage import data
    from devise.models.backbones import load_backbone
    from devise.labels.vectors import embed_labels

    backbone = load_backbone()
    from devise.data.images import load_image
    from PIL import Image
    images = []
    for array in (data.chelsea(), data.coffee()):
        Image.fromarray(array).save("/tmp/_conse_test.png")
        images.append(load_image("/tmp/_conse_test.png", backbone.image_size))
    logits = backbone.classifier.predict(backbone.features_model.predict(np.stack(images), verbose=0), verbose=0)
    kept, class_vectors, embedding = imagenet1k_class_vectors(glove)
    assert 980 <= len(kept) <= 1000 and class_vectors.shape == (len(kept), 50)
    labels = ["cat", "coffee", "car", "airplane", "guitar", "horse", "tree", "mountain"]  # no other food
    targets = embed_labels(labels, glove).matrix
    scores = conse_from_logits(logits, class_vectors, kept, T=10) @ targets.T
    assert [labels[i] for i in scores.argmax(1)] == ["cat", "coffee"]
