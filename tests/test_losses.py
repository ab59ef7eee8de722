"""Loss values against a direct numpy computation on real GloVe label vectors."""
import numpy as np
import pytest

import devise  # noqa: F401  (sets the Keras backend)
import keras
from keras import ops

from devise.training.losses import CosineLoss, HingeRankLoss, hinge_rank_loss
from devise.errors import DeviseError
from devise.labels.vectors import unit_rows

WORDS = ["cat", "dog", "truck", "pizza", "violin", "tiger", "bus", "apple"]


@pytest.fixture(scope="module")
def label_vectors():
    from devise.labels.vectors import embed_labels, load_vectors
    return embed_labels(WORDS, load_vectors("glove-6b-50d")).matrix


@pytest.fixture(scope="module")
def case(label_vectors):
    """Projections near a label's vector (and near a confusable one), raw scale as a linear M gives."""
    rng = np.random.default_rng(3)
    y = np.array([0, 1, 2, 3, 5, 6, 7, 4, 0, 2])
    confuse = np.array([5, 0, 6, 7, 0, 2, 3, 1, 1, 3])        # cat~tiger, dog~cat, truck~bus, ...
    pred = 0.6 * label_vectors[y] + 0.5 * label_vectors[confuse] + 0.1 * rng.standard_normal((10, 50))
    return y, pred.astype(np.float32)


def numpy_terms(y, pred, T, margin=0.1):
    """Eq. 1 term by term: max(0, margin - t_y.p + t_j.p) for j != y, written as plainly as possible."""
    terms = np.zeros((len(y), len(T)))
    for i in range(len(y)):
        for j in range(len(T)):
            if j != y[i]:
                terms[i, j] = max(0.0, margin - T[y[i]] @ pred[i] + T[j] @ pred[i])
    return terms


def test_full_sum_matches_numpy(label_vectors, case):
    y, pred = case
    expected = numpy_terms(y, pred, label_vectors).sum(axis=1)
    got = np.asarray(hinge_rank_loss(y, pred, label_vectors, truncated=False))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert (expected > 0).any() and (expected == 0).any()      # the case has both kinds of sample
    loss = HingeRankLoss(label_vectors, truncated=False)
    np.testing.assert_allclose(float(loss(y, pred)), expected.mean(), rtol=1e-5)


def test_truncated_follows_the_key_order(label_vectors, case):
    y, pred = case
    terms = numpy_terms(y, pred, label_vectors)
    rng = np.random.default_rng(0)
    for _ in range(5):
        keys = np.stack([rng.permutation(len(WORDS)) for _ in y]).astype(np.float32)  # order negatives are met in
        expected = []
        for i in range(len(y)):
            first = [j for j in np.argsort(keys[i]) if terms[i, j] > 0]    # walk the order, stop at a violator
            expected.append(terms[i, first[0]] if first else 0.0)
        got = np.asarray(hinge_rank_loss(y, pred, label_vectors, truncated=True, keys=keys))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert np.all(got <= terms.sum(axis=1) + 1e-6)


def test_truncated_expectation_is_mean_violating_term(label_vectors, case):
    """Met in a uniform random order, the first violator is uniform among the violators."""
    y, pred = case
    terms = numpy_terms(y, pred, label_vectors)
    violators = terms > 0
    expected = np.where(violators.any(1), terms.sum(1) / np.maximum(violators.sum(1), 1), 0.0).mean()
    loss = HingeRankLoss(label_vectors, truncated=True, seed=7)
    draws = np.array([float(loss(y, pred)) for _ in range(400)])
    assert len(set(draws.round(6))) > 1                            # each call draws a new order
    assert abs(draws.mean() - expected) < 0.05 * expected
    assert draws.max() <= terms.sum(1).mean() + 1e-6


def test_normalize_output_scores_cosine(label_vectors, case):
    y, pred = case
    unit = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    expected = numpy_terms(y, unit, label_vectors).sum(1)
    got = np.asarray(hinge_rank_loss(y, pred * 5.0, label_vectors, truncated=False, normalize_output=True))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_cosine_loss_matches_numpy(label_vectors, case):
    y, pred = case
    cos = (pred * label_vectors[y]).sum(1) / np.linalg.norm(pred, axis=1)
    loss = CosineLoss(label_vectors)
    np.testing.assert_allclose(float(loss(y.reshape(-1, 1), pred)), (1 - cos).mean(), rtol=1e-5)


def test_seed_state_advances_inside_jitted_fit(label_vectors):
    """Under JAX the train step is jitted: the loss's seed state must advance once per batch."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((50,))
    model = keras.Model(inputs, keras.layers.Dense(50, use_bias=False)(inputs))
    loss = HingeRankLoss(label_vectors, seed=1)
    model.hinge_loss_seed = loss.seed_generator              # what train.py does
    model.compile(optimizer="adam", loss=loss)
    before = np.array(loss.seed_generator.state.value)
    x = np.random.default_rng(0).standard_normal((64, 50)).astype(np.float32)
    model.fit(x, np.arange(64) % len(WORDS), batch_size=16, epochs=2, verbose=0)
    after = np.array(loss.seed_generator.state.value)
    assert int(after[1]) - int(before[1]) == 8                  # 2 epochs x 4 batches


def test_bad_label_vectors():
    with pytest.raises(DeviseError, match="all zeros"):
        unit_rows(np.zeros((3, 4)), strict=True)  # as the losses call it
    with pytest.raises(DeviseError, match="2-d"):
        HingeRankLoss(np.ones(4))
    assert np.allclose(np.linalg.norm(np.asarray(ops.convert_to_numpy(
        HingeRankLoss(np.ones((2, 3))).label_vectors)), axis=1), 1)
