"""Heads: the paper's linear M, the Keras blog's MLP, the softmax baseline."""
import numpy as np
import pytest

import devise  # noqa: F401
from devise.errors import DeviseError
from devise.models.heads import HEAD_BUILDERS, build_head, linear_head, mlp_head, softmax_head
from devise.training.train import HEADS


def test_linear_head_is_a_bias_free_matrix():
    model = linear_head(1280, 50)
    assert model.count_params() == 1280 * 50
    x = np.random.default_rng(0).standard_normal((4, 1280)).astype(np.float32)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)  # features are unit-normalised first by default
    np.testing.assert_allclose(model.predict(x, verbose=0), unit @ model.get_weights()[0], rtol=1e-5, atol=1e-5)
    raw = linear_head(1280, 50, normalize_features=False)
    np.testing.assert_allclose(raw.predict(x, verbose=0), x @ raw.get_weights()[0], rtol=1e-5, atol=1e-5)
    assert linear_head(1280, 50, use_bias=True).count_params() == 1280 * 50 + 50


def test_mlp_head_is_the_blog_head():
    model = mlp_head(1280, 300)
    kinds = [type(layer).__name__ for layer in model.layers[1:]]
    assert kinds == ["UnitNormalization", "Rescaling", "Dropout", "Dense", "BatchNormalization", "Dense"]
    assert model.layers[3].rate == 0.3 and model.layers[4].units == 1024
    assert model.layers[4].activation.__name__ == "relu" and model.output_shape == (None, 300)
    blog = [type(layer).__name__ for layer in mlp_head(1280, 300, normalize_features=False).layers[1:]]
    assert blog == ["Dropout", "Dense", "BatchNormalization", "Dense"]


def test_softmax_head_gives_probabilities():
    model = softmax_head(64, 7)
    probs = model.predict(np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32), verbose=0)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    assert softmax_head(64, 7, hidden=32).count_params() == 64 * 32 + 32 + 32 * 7 + 7


def test_build_head_by_name():
    assert build_head("mlp", 8, 4).output_shape == (None, 4)
    with pytest.raises(DeviseError, match="unknown head 'conv'"):
        build_head("conv", 8, 4)


def test_every_training_head_is_registered():
    assert set(HEADS) | {"softmax"} == set(HEAD_BUILDERS)   # train's choices (and its classifier) build by name
    assert build_head("softmax", 8, 3).output_shape == (None, 3)
