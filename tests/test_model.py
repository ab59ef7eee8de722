"""devise.load and DeviseModel: presets, saving and loading back, and which name means what."""
import numpy as np
import pytest

from devise.errors import DeviseError
from devise.model import load
from devise.presets import list_presets


def test_a_saved_preset_loads_back_and_a_same_named_folder_does_not_shadow_the_preset(tmp_path, monkeypatch):
    conse = load("conse")
    folder = conse.save(tmp_path / "conse")
    monkeypatch.chdir(tmp_path)
    assert load("conse") is conse  # the default model does not change with the working directory
    back = load("./conse")
    assert back is not conse and back.method == "conse" and back.class_names == conse.class_names
    logits = np.random.default_rng(0).standard_normal((4, 1000)).astype(np.float32)
    np.testing.assert_allclose(back.encode_features(None, logits), conse.encode_features(None, logits), atol=1e-6)
    assert load(folder) is back  # a Path is always a folder


def test_recipes_are_not_models():
    assert "conse" in list_presets("model") and "devise_softmax_mlp" in list_presets("recipe")
    with pytest.raises(DeviseError, match="training recipe"):
        load("devise_softmax_mlp")
    with pytest.raises(DeviseError, match="no such model"):
        load("no-such-model")
