"""The Keras EfficientNet-Lite0 and Lite2 against the reference PyTorch package on 20 real ImageNet photos,
both depthwise formulations, the registry, loading without random initializers, `devise classify`, and
one-line errors for bad weights."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devise.assets import foolbox_data_dir
from devise.models import backbones
from devise.models.backbones import list_backbones, load_backbone
from devise.models.classify import classify
from devise.cli import main
from devise.errors import DeviseError
from devise.data.images import load_image

REFERENCE = Path(__file__).parent / "data" / "foolbox_reference.npz"
REFERENCE_LITE2 = Path(__file__).parent / "data" / "foolbox_reference_lite2.npz"
CAT_SYNSETS = {"n02124075", "n02123045", "n02123159"}  # Egyptian cat, tabby, tiger cat


@pytest.fixture(scope="module")
def reference():
    ref = np.load(REFERENCE)
    images = np.stack([load_image(foolbox_data_dir() / name, 224) for name in ref["files"]])
    return images, ref["logits"], ref["labels"]


@pytest.fixture(scope="module")
def chelsea(tmp_path_factory):
    import skimage.data

    path = tmp_path_factory.mktemp("photos") / "chelsea.jpg"
    Image.fromarray(skimage.data.chelsea()).save(path, quality=95)
    return path


def _topk_hits(logits, labels, k):
    top = np.argsort(-logits, axis=1)[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


def test_lite0_matches_pytorch_reference_on_foolbox_photos(reference):
    images, ref_logits, labels = reference
    backbone = load_backbone("efficientnet_lite0")
    assert (backbone.image_size, backbone.feature_dim) == (224, 1280)
    assert backbone.class_wnids[281] == "n02123045" and len(backbone.class_names) == 1000
    features = np.asarray(backbone.features_model.predict_on_batch(images))
    assert features.shape == (20, 1280) and features.dtype == np.float32
    logits = np.asarray(backbone.classifier.predict_on_batch(features))
    rel_err = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
    assert rel_err <= 1e-3, rel_err
    assert _topk_hits(logits, labels, 1) >= _topk_hits(ref_logits, labels, 1) == 16
    assert _topk_hits(logits, labels, 5) >= 19


def test_lite2_matches_pytorch_reference_on_foolbox_photos():
    """Lite2 (width 1.1, depth 1.2, 260 px; the converter calls it 'not thoroughly tested') against the
    reference package's logits on the same 260-px uint8 photos."""
    ref = np.load(REFERENCE_LITE2)
    images = np.stack([load_image(foolbox_data_dir() / name, 260) for name in ref["files"]])
    ref_logits, labels = ref["logits"], ref["labels"]
    backbone = load_backbone("efficientnet_lite2")
    assert (backbone.image_size, backbone.feature_dim) == (260, 1280)
    assert len(backbone.features_model.weights) == 2 * (1 + 20 * 3 + 1 * 2 + 1)  # stem, 21 blocks (the first unexpanded), head
    features = np.asarray(backbone.features_model.predict_on_batch(images))
    assert features.shape == (20, 1280) and features.dtype == np.float32
    logits = np.asarray(backbone.classifier.predict_on_batch(features))
    rel_err = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
    top1, top5 = _topk_hits(logits, labels, 1), _topk_hits(logits, labels, 5)
    print(f"efficientnet_lite2 on foolbox's 20 photos: top-1 {top1}/20, top-5 {top5}/20 (reference "
          f"{_topk_hits(ref_logits, labels, 1)}/20, {_topk_hits(ref_logits, labels, 5)}/20), max rel. logit diff {rel_err:.2g}")
    assert rel_err <= 1e-3, rel_err
    assert top1 >= _topk_hits(ref_logits, labels, 1) == 17
    assert top5 >= _topk_hits(ref_logits, labels, 5) == 19
    assert backbone.cache_key != load_backbone("efficientnet_lite0").cache_key


def test_lite0_and_lite2_side_by_side_are_each_part(reference):
    """The default training backbone: Lite2's features exactly, beside Lite0's from the same 260-px image
    resized to 224 inside the model (close to Lite0 on its own 224-px decode), and Lite0's classifier."""
    ref = np.load(REFERENCE_LITE2)
    images = np.stack([load_image(foolbox_data_dir() / name, 260) for name in ref["files"]])
    both = load_backbone("efficientnet_lite0_lite2")
    assert (both.image_size, both.feature_dim) == (260, 2560)
    features = np.asarray(both.features_model.predict_on_batch(images))
    lite2 = np.asarray(load_backbone("efficientnet_lite2").features_model.predict_on_batch(images))
    np.testing.assert_allclose(features[:, 1280:], lite2, rtol=1e-5, atol=1e-5)
    lite0 = np.asarray(load_backbone("efficientnet_lite0").features_model.predict_on_batch(reference[0]))
    cosine = (features[:, :1280] * lite0).sum(1) / np.linalg.norm(features[:, :1280], axis=1) / np.linalg.norm(lite0, axis=1)
    assert cosine.min() > 0.9, cosine.min()
    logits = np.asarray(both.classifier.predict_on_batch(features))
    np.testing.assert_allclose(logits, np.asarray(load_backbone("efficientnet_lite0").classifier.predict_on_batch(
        features[:, :1280])), rtol=1e-5, atol=1e-4)
    print(f"efficientnet_lite0_lite2: Lite0 part cosine to Lite0 alone min {cosine.min():.3f}, median "
          f"{np.median(cosine):.3f}; top-1 {_topk_hits(logits, reference[2], 1)}/20")
    assert _topk_hits(logits, reference[2], 1) >= 15 and _topk_hits(logits, reference[2], 5) >= 19
    assert both.cache_key not in (load_backbone("efficientnet_lite0").cache_key, load_backbone("efficientnet_lite2").cache_key)
    _assert_one_line(lambda: load_backbone("efficientnet_lite0_lite2", weights=REFERENCE), "takes no weights file")


def test_registry_names_every_backbone():
    assert list_backbones() == ["efficientnet_lite0", "efficientnet_lite2", "resnet50", "efficientnet_lite0_lite2"]
    assert load_backbone("EfficientNet-Lite2") is load_backbone("efficientnet_lite2")
    _assert_one_line(lambda: load_backbone("efficientnet_lite3"),
                     "choose one of efficientnet_lite0, efficientnet_lite2, resnet50, efficientnet_lite0_lite2")


def test_a_checkpoint_of_another_lite_variant_is_refused():
    """Lite0's checkpoint has every Lite2 tensor name, but not its shapes: refused by name, one line."""
    from devise.assets import efficientnet_lite0_checkpoint, efficientnet_lite2_checkpoint

    _assert_one_line(lambda: load_backbone("efficientnet_lite2", weights=efficientnet_lite0_checkpoint()),
                     "not an EfficientNet-Lite2 checkpoint")
    _assert_one_line(lambda: load_backbone("efficientnet_lite0", weights=efficientnet_lite2_checkpoint()),
                     "not an EfficientNet-Lite0 checkpoint")


def test_loading_runs_no_random_initializer(monkeypatch):
    """Building a backbone creates its variables from the checkpoint: no Keras initializer draws weights
    that are overwritten anyway, and (on JAX) nothing is compiled. A fresh build, past the cache."""
    import keras

    calls = []

    def spy(cls):
        original = cls.__call__

        def counted(self, *args, **kwargs):
            calls.append(type(self).__name__)
            return original(self, *args, **kwargs)
        monkeypatch.setattr(cls, "__call__", counted)

    pending = [keras.initializers.Initializer]
    while pending:  # every initializer class Keras defines (ours, which returns the loaded array, excepted)
        cls = pending.pop()
        pending += cls.__subclasses__()
        if "__call__" in vars(cls) and cls.__module__.startswith("keras.") and cls is not backbones._Given:
            spy(cls)
    keras.layers.Dense(3).build((None, 2))  # the spy sees Keras' own initializers
    assert calls == ["GlorotUniform", "Zeros"]
    calls.clear()

    compiles, listening = [], [True]
    if keras.config.backend() == "jax":
        import jax

        def listener(event, duration, **_):  # JAX offers no public way to unregister: switched off below
            if listening[0] and event.endswith("backend_compile_duration"):
                compiles.append(event)
        jax.monitoring.register_event_duration_secs_listener(listener)
    weights = str(backbones.efficientnet_lite0_checkpoint())
    try:
        fresh = backbones._build.__wrapped__("efficientnet_lite0", weights, "test-no-init", "shifted", "float32")
    finally:
        listening[0] = False
    assert calls == [] and compiles == []
    # The same numbers as the cached backbone, and the layers' configs hold no arrays (clone_model, saving).
    cached = load_backbone("efficientnet_lite0", depthwise="shifted")
    for mine, theirs in zip(fresh.features_model.weights, cached.features_model.weights):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    config = fresh.features_model.to_json()
    assert "_Given" not in config and len(config) < 200_000


def test_depthwise_formulations_agree(reference):
    images = reference[0][:8]
    shifted = load_backbone(depthwise="shifted").features_model.predict_on_batch(images)
    grouped = load_backbone(depthwise="grouped").features_model.predict_on_batch(images)
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(grouped), atol=1e-4, rtol=0)


def test_backbone_is_cached_and_keyed():
    first = load_backbone("efficientnet_lite0")
    assert load_backbone("efficientnet-lite0") is first
    assert first.cache_key.startswith("efficientnet_lite0-") and len(first.cache_key) > 20


def test_chelsea_is_a_cat(chelsea):
    [result] = classify([chelsea], top_k=3)
    assert result["image"] == str(chelsea)
    assert result["predictions"][0]["synset"] in CAT_SYNSETS


def test_classify_cli_json(chelsea, capsys):
    coffee = chelsea.parent / "coffee.png"
    import skimage.data

    Image.fromarray(skimage.data.coffee()).save(coffee)
    assert main(["classify", "--json", "--top", "3", str(chelsea), str(coffee)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    results = [json.loads(line) for line in lines]
    assert [r["image"] for r in results] == [str(chelsea), str(coffee)]
    for r in results:
        preds = r["predictions"]
        assert len(preds) == 3 and set(preds[0]) == {"label", "synset", "score"}
        scores = [p["score"] for p in preds]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
        assert all(p["synset"].startswith("n") and len(p["synset"]) == 9 for p in preds)
    assert results[1]["predictions"][0]["label"] == "espresso"

    assert main(["classify", "--json", "--backbone", "efficientnet_lite2", "--top", "3", str(chelsea)]) == 0
    lite2 = json.loads(capsys.readouterr().out)
    assert lite2["predictions"][0]["synset"] in CAT_SYNSETS

    assert main(["classify", str(chelsea), "--top", "2"]) == 0
    table = capsys.readouterr().out
    assert str(chelsea) in table and "1." in table and "2." in table and "3." not in table


def test_unreadable_image_is_a_one_line_error(tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DeviseError, match="broken.jpg"):
        classify([broken])
    assert main(["classify", str(tmp_path / "missing.jpg")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.jpg" in err


def _assert_one_line(call, must_contain):
    with pytest.raises(DeviseError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and must_contain in message, message


def test_bad_weights_files_give_one_line_errors(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02garbage" * 100)
    _assert_one_line(lambda: load_backbone("efficientnet_lite0", weights=corrupt), "corrupt.pth")
    _assert_one_line(lambda: load_backbone("efficientnet_lite0", weights=tmp_path / "none.pth"), "none.pth")
    # A readable checkpoint of some other network is refused by name, not with a shape traceback.
    small = Path(__file__).parent / "data" / "torch_small_zip.pt"
    _assert_one_line(lambda: load_backbone("efficientnet_lite0", weights=small), "not an EfficientNet-Lite0")
    _assert_one_line(lambda: load_backbone("resnet50", weights=tmp_path / "none.h5"), "none.h5")
    bad_h5 = tmp_path / "bad.h5"
    bad_h5.write_bytes(b"not hdf5")
    _assert_one_line(lambda: load_backbone("resnet50", weights=bad_h5), "bad.h5")
    _assert_one_line(lambda: load_backbone("vgg16"), "unknown backbone")
    _assert_one_line(lambda: load_backbone("efficientnet_lite2", weights=tmp_path / "none.pth"), "none.pth")
    _assert_one_line(lambda: load_backbone("efficientnet_lite2", weights=small), "not an EfficientNet-Lite2")


@pytest.mark.slow
def test_resnet50_from_a_local_weights_file(tmp_path, chelsea):
    """The resnet50 path end to end with a weights file Keras wrote (random init: no real weights offline)."""
    import keras

    reference_model = keras.applications.ResNet50(include_top=True, weights=None)
    weights = tmp_path / "resnet50.weights.h5"
    reference_model.save_weights(weights)
    backbone = load_backbone("resnet50", weights=weights)
    assert (backbone.feature_dim, backbone.image_size) == (2048, 224)
    image = load_image(chelsea, 224)[None]
    logits = np.asarray(backbone.classifier.predict_on_batch(backbone.features_model.predict_on_batch(image)))
    # Keras' own model: caffe preprocessing outside, softmax on top; ours: uint8 in, logits out.
    expected = reference_model.predict_on_batch(keras.applications.resnet50.preprocess_input(image.astype("float32")))
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(probs, np.asarray(expected), rtol=1e-3, atol=0)
    assert backbone.cache_key != load_backbone("efficientnet_lite0").cache_key


def test_bfloat16_backbone_is_close_to_float32(foolbox_photos):
    """The GPU default (mixed bfloat16) run on CPU: float32 outputs, same top-1 on real photos."""
    from devise.data.images import load_image

    images = np.stack([load_image(p, 224) for p in foolbox_photos[:4]])
    full = load_backbone("efficientnet_lite0", precision="float32")
    half = load_backbone("efficientnet_lite0", precision="bfloat16")
    assert half.cache_key != full.cache_key
    f32 = np.asarray(full.features_model.predict_on_batch(images))
    b16 = np.asarray(half.features_model.predict_on_batch(images))
    assert b16.dtype == np.float32
    assert np.abs(b16 - f32).max() <= 0.1 * np.abs(f32).max()
    logits32 = np.asarray(full.classifier.predict_on_batch(f32))
    logits16 = np.asarray(half.classifier.predict_on_batch(b16))
    assert (logits32.argmax(1) == logits16.argmax(1)).all()


def _run_python(code: str, **env):
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    result = subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_import_devise_enables_the_persistent_compilation_cache(tmp_path):
    """`import devise` points JAX's compilation cache at the data home with thresholds that keep even
    small, quick programs, and a jitted function then lands on disk; a user's own cache dir wins."""
    code = ("import devise, jax, jax.numpy as jnp; jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready(); "
            "print(jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs, "
            "jax.config.jax_persistent_cache_min_entry_size_bytes)")
    folder, min_time, min_size = _run_python(code, DEVISE_HOME=str(tmp_path / "home")).split()
    assert folder == str(tmp_path / "home" / "jax-cache") and float(min_time) == 0 and int(min_size) == -1
    assert any(Path(folder).iterdir())
    mine = tmp_path / "mine"
    assert _run_python(code, DEVISE_HOME=str(tmp_path / "home"), JAX_COMPILATION_CACHE_DIR=str(mine)).split()[0] == str(mine)


def test_exported_forward_is_reused_across_processes_with_the_same_numbers(tmp_path, monkeypatch, reference):
    """The traced forward kept on disk (jax.export, needs flatbuffers) gives the numbers of a plain
    predict_on_batch, and a fresh compiled_forward loads it instead of exporting again."""
    import importlib.util

    from devise.runtime import compiled_forward

    if importlib.util.find_spec("flatbuffers") is None:
        pytest.skip("flatbuffers not installed: the forward is traced in every process")
    monkeypatch.setenv("DEVISE_HOME", str(tmp_path))
    model = load_backbone("efficientnet_lite0").features_model
    images = reference[0][:2]
    first = np.asarray(compiled_forward(model)(images))
    [saved] = list((tmp_path / "exported").iterdir())
    stamp = saved.stat().st_mtime_ns
    second = np.asarray(compiled_forward(model)(images))
    assert saved.stat().st_mtime_ns == stamp and len(list((tmp_path / "exported").iterdir())) == 1
    expected = np.asarray(model.predict_on_batch(images))
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(first, second)
