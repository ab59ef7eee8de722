"""ONNX export (devise.models.export): presets and trained runs run in onnxruntime as they do in Keras, and
examples/onnx_predict.py (onnxruntime, numpy and Pillow only) names images as `devise predict` does.

The tests that export skip when the `export` extra (onnxruntime, jax2onnx) is not installed."""
import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devise.errors import DeviseError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "onnx_predict.py"


def _needs_extra():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("jax2onnx")


def _example():
    pytest.importorskip("onnxruntime")
    spec = importlib.util.spec_from_file_location("onnx_predict", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_imports_neither_devise_nor_keras_nor_jax():
    imported = set()
    for node in ast.walk(ast.parse(EXAMPLE.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported == {"json", "sys", "pathlib", "numpy", "onnxruntime", "PIL"}


def test_the_example_frames_images_exactly_as_devise(tmp_path, foolbox_photos):
    """Photos (JPEG draft decoding), emoji cut-outs and other Pillow modes: the same uint8 pixels."""
    from devise.assets import data_home
    from devise.data.images import load_image

    frame = _example().frame
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (90, 150, 4), dtype=np.uint8)
    rgba[:20] = 0  # a transparent band: a cut-out
    translucent = rgba.copy()
    translucent[..., 3] = 128  # no pixel fully transparent: framed as a photo, on white
    made = {"cutout.png": Image.fromarray(rgba), "translucent.png": Image.fromarray(translucent),
            "grey.png": Image.fromarray(rgba[..., 0]), "palette.gif": Image.fromarray(rgba[..., :3]).convert("P"),
            "tall.jpg": Image.fromarray(rgba[..., :3]).transpose(Image.Transpose.ROTATE_90)}
    for name, image in made.items():
        image.save(tmp_path / name)
    emoji = sorted((data_home() / "emoji" / "images").rglob("*.png"))[:40:8]
    paths = foolbox_photos[:6] + emoji + sorted(tmp_path.iterdir())
    for path in paths:
        for size in (224, 260):
            np.testing.assert_array_equal(frame(path, size, 0.875), load_image(path, size), err_msg=str(path))


def test_export_refuses_before_any_work(tmp_path, monkeypatch):
    """An existing folder, a random control, and a missing extra: one-line errors, nothing written."""
    from devise.cli import main
    from devise.models.model import DeviseModel

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    control = DeviseModel("random", None, ["cat"], np.ones((1, 4), np.float32), {"seed": 0}, name="control")
    with pytest.raises(DeviseError, match="already exists"):
        control.export(tmp_path / "taken")
    with pytest.raises(DeviseError, match="unknown export format"):
        control.export(tmp_path / "new", format="tflite")
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # as if the extra were not installed
    with pytest.raises(DeviseError, match=r"pip install -e '\.\[export\]'"):
        control.export(tmp_path / "new")
    assert main(["export", "conse", "--out", str(tmp_path / "new")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.fixture(scope="module")
def conse_export(tmp_path_factory):
    """The default preset exported with the default (WordNet) vocabulary, by the command."""
    _needs_extra()
    from devise.cli import main

    out = tmp_path_factory.mktemp("export") / "conse"
    assert main(["export", "conse", "--format", "onnx", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_conse_export_files_and_checked_parity(conse_export):
    manifest = json.loads((conse_export / "manifest.json").read_text())
    assert sorted(p.name for p in conse_export.iterdir()) == [
        "image.onnx", "image.onnx.data", "labels.npy", "labels.txt", "manifest.json", "text.onnx",
        "text.onnx.data", "tokenizer.json"]
    for what in ("images", "texts"):
        assert manifest["parity"][what]["count"] == 64
        assert manifest["parity"][what]["same_top5"] == 64
        assert manifest["parity"][what]["max_abs"] <= 1e-4
    assert manifest["image"]["size"] == 224 and manifest["label_space"] == {"vectors": "minilm", "dim": 384}
    labels = np.load(conse_export / "labels.npy")
    assert labels.shape == (manifest["labels"]["count"], 384)
    assert len((conse_export / "labels.txt").read_text().splitlines()) == len(labels)
    assert 0.9 <= manifest["sizes"]["ratio"] <= 1.1  # the image model's files against the Keras weights


@pytest.mark.slow
def test_the_example_names_images_as_devise_predict_does(conse_export, foolbox_photos, capsys):
    from devise.assets import data_home
    from devise.cli import main

    images = [str(p) for p in foolbox_photos[:4]] + [str(sorted((data_home() / "emoji" / "images").rglob("*.png"))[7])]
    example = subprocess.run([sys.executable, str(EXAMPLE), str(conse_export), *images], capture_output=True,
                             text=True, check=True).stdout
    assert main(["predict", *images]) == 0
    predicted = capsys.readouterr().out

    def ranked(text):  # labels and synsets in rank order (scores, and predict's probabilities, left out)
        rows = (re.match(r"\s+\d+\.\s+[+-]?\d\.\d+(?:\s+\d+\.\d%)?\s+(.*)$", line) for line in text.splitlines())
        return [row.group(1) for row in rows if row]

    assert len(ranked(example)) == 5 * len(images)
    assert ranked(example) == ranked(predicted)


@pytest.mark.slow
def test_the_text_model_embeds_labels_as_devise_does(conse_export):
    """text.onnx with tokenizer.json (tokenizers, onnxruntime): new labels without devise."""
    import onnxruntime
    from tokenizers import Tokenizer

    import devise

    texts = ["a tabby cat asleep on a sofa", "red double-decker bus", "x" * 2000]  # the last is truncated
    tokenizer = Tokenizer.from_file(str(conse_export / "tokenizer.json"))
    tokenizer.enable_truncation(json.loads((conse_export / "manifest.json").read_text())["text"]["max_length"])
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(texts)
    inputs = {"input_ids": np.array([e.ids for e in encoded], np.int32),
              "attention_mask": np.array([e.attention_mask for e in encoded], np.int32)}
    session = onnxruntime.InferenceSession(str(conse_export / "text.onnx"), providers=["CPUExecutionProvider"])
    vectors = session.run(None, inputs)[0]
    np.testing.assert_allclose(vectors, devise.load("conse").encode_labels(texts), atol=1e-4)


@pytest.fixture(scope="module")
def small_training_set():
    """Twelve emoji classes, every style: their real images' paths, class ids and names."""
    from devise.data.datasets import load_dataset

    dataset = load_dataset("emoji")
    classes = list(range(0, 240, 20))
    rows = np.flatnonzero(np.isin(dataset.labels, classes))
    return [dataset.paths[i] for i in rows], np.searchsorted(classes, dataset.labels[rows]), \
        [dataset.classes[c] for c in classes]


def _trained_run(folder, training_set, backbone, vectors, **options):
    """A real run on the backbone's cached features of the small set (a few epochs: cheap, not good)."""
    from devise.data.features import extract_features
    from devise.training.train import train
    from devise.labels.vectors import embed_labels, load_vectors

    paths, labels, names = training_set
    features = np.asarray(extract_features(paths, backbone, progress=False).features)
    label_vectors = embed_labels(names, load_vectors(vectors)).matrix
    return train(options.pop("method", "devise"), features, labels, names, label_vectors, epochs=3, verbose=0,
                 out_dir=folder, vectors_spec=vectors, backbone_name=backbone, **options)


@pytest.mark.slow
def test_the_exported_resize_gives_xla_pixels_bit_for_bit(tmp_path, foolbox_photos):
    """The side-by-side backbone's in-model resize (260 -> 224 px, rounded to uint8) as exported: the
    same pixels in onnxruntime as ResizeImages in JAX, on real photos and on noise (every value)."""
    _needs_extra()
    import jax
    import onnxruntime

    from devise.models.backbones import ResizeImages, load_backbone
    from devise.models.export import onnx_features_model, write_onnx
    from devise.data.images import load_images

    features_model = load_backbone("efficientnet_lite0_lite2", depthwise="grouped", precision="float32").features_model
    resize = next(layer for layer in features_model.layers if isinstance(layer, ResizeImages))
    exported = next(layer for layer in onnx_features_model(features_model).layers if layer.name == resize.name)
    write_onnx(exported, [jax.ShapeDtypeStruct(("B", 260, 260, 3), np.uint8)], ["images"], tmp_path / "resize.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "resize.onnx"), providers=["CPUExecutionProvider"])
    noise = np.random.default_rng(0).integers(0, 256, (16, 260, 260, 3), dtype=np.uint8)
    for images in (load_images(foolbox_photos, 260)[0], noise):
        np.testing.assert_array_equal(session.run(None, {"images": images})[0], np.asarray(jax.jit(resize)(images)))


@pytest.mark.slow
def test_an_ensemble_on_the_side_by_side_backbone_exports(tmp_path, small_training_set):
    """Five MLP heads on Lite0 + Lite2 (260 px, Lite0 reading a resized copy), in a word-vector space:
    the run folder exports within the default bound, and its word vectors go beside image.onnx instead of
    a text model. The resized copy is rounded to uint8 inside the model: the exported resize must give
    XLA's float pixels to the last bit (any other order of its sums flips a few pixels, ~4e-4)."""
    _needs_extra()
    import devise

    _trained_run(tmp_path / "run", small_training_set, "efficientnet_lite0_lite2", "glove-6b-50d",
                 head="mlp", loss="softmax", ensemble=5)
    run = devise.load(tmp_path / "run")
    out = run.export(tmp_path / "onnx", vocab="imagenet1k")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image"]["size"] == 260 and manifest["backbone"] == "efficientnet_lite0_lite2"
    assert manifest["parity"]["images"]["same_top5"] == 64 and manifest["parity"]["images"]["max_abs"] <= 1e-4
    assert manifest["text"]["kind"] == "word vectors" and "texts" not in manifest["parity"]
    assert np.load(out / "vectors.npy").shape == (len((out / "words.txt").read_text().splitlines()), 50)


@pytest.mark.slow
def test_a_trained_conse_run_exports_and_a_failed_check_leaves_nothing(tmp_path, small_training_set, monkeypatch):
    """ConSE over a trained softmax head (top-T mix inside the graph); with an impossible bound the
    export fails loudly and leaves neither the folder nor its temporary files."""
    _needs_extra()
    import devise
    import devise.models.export

    _trained_run(tmp_path / "run", small_training_set, "efficientnet_lite0", "minilm", method="conse")
    run = devise.load(tmp_path / "run")
    monkeypatch.setattr(devise.models.export, "PARITY_MAX_ABS", 0.0)
    with pytest.raises(DeviseError, match="failed its check on images.*the top-5 agree: .*--max-abs"):
        run.export(tmp_path / "onnx", vocab="imagenet1k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    monkeypatch.undo()
    out = run.export(tmp_path / "onnx", vocab="imagenet1k", check_texts=["cat", "a kind of dog", "bus"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "conse" and manifest["parity"]["images"]["same_top5"] == 64
    assert manifest["parity"]["texts"]["count"] == 3
