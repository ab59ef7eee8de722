"""devise.load and DeviseModel: presets, saving and loading back, and which name means what."""
import numpy as np
import pytest

from devise.errors import DeviseError
from devise.models.model import load
from devise.models.presets import list_presets


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


def test_encode_images_takes_what_a_user_holds(tmp_path):
    """A path, a list of paths, a uint8 batch at the backbone's size, HxWx3 arrays of any size and PIL images
    (framed like files: the same vectors as the file), a list mixing them; anything else is a one-line
    TypeError that never prints the array. A single string of labels is one label."""
    import skimage.data
    from PIL import Image

    from devise.data.images import load_image

    model = load("conse")
    size = model.backbone.image_size
    chelsea, coffee = skimage.data.chelsea(), skimage.data.coffee()  # 300x451, 400x600: not the backbone's size
    Image.fromarray(chelsea).save(tmp_path / "chelsea.png")
    Image.fromarray(coffee).save(tmp_path / "coffee.png")
    files = model.encode_images([tmp_path / "chelsea.png", str(tmp_path / "coffee.png")])
    assert files.shape == (2, model.dim)
    np.testing.assert_allclose(model.encode_images(str(tmp_path / "chelsea.png")), files[:1], atol=1e-6)
    batch = np.stack([load_image(tmp_path / "chelsea.png", size), load_image(tmp_path / "coffee.png", size)])
    for same in (batch, [chelsea, coffee], [Image.fromarray(chelsea), Image.fromarray(coffee)],
                 [chelsea, tmp_path / "coffee.png"], (x for x in [chelsea, coffee])):
        np.testing.assert_allclose(model.encode_images(same), files, atol=1e-5)
    np.testing.assert_allclose(model.encode_images(chelsea), files[:1], atol=1e-5)
    np.testing.assert_allclose(model.encode_images(Image.fromarray(coffee)), files[1:], atol=1e-5)
    assert model.encode_images([]).shape == (0, model.dim)

    for bad, words in ((chelsea.astype(np.float32), "float32 array of shape (300, 451, 3)"),
                       (batch.astype(np.float64), "float64 array of shape (2, 224, 224, 3)"),
                       ([chelsea, {"a": 1}], "images[1]: not an image: got an object of type dict"),
                       (42, "type int"), (b"\x89PNG", "type bytes"), (np.zeros((4, 4, 7), np.uint8), "(4, 4, 7)")):
        with pytest.raises(TypeError) as info:
            model.encode_images(bad)
        message = str(info.value)
        assert words in message and "\n" not in message and len(message) < 200, message

    ranked = model.predict(chelsea, labels="dog")
    assert [[p["label"] for p in image] for image in ranked] == [["dog"]]
    assert model.encode_labels("tabby cat").shape == (1, model.dim)
    assert [p["label"] for p in model.predict([chelsea], labels=("dog", "tabby cat"), top=1)[0]] == ["tabby cat"]
