"""Files going wrong under devise (issue 20): run folders and checkpoints with damaged or swapped files, image
indexes with damaged files or non-finite rows, two builds of one index at once, and full disks (a real small
tmpfs where the machine lets a test mount one; else the test is skipped). Every case ends in one DeviseError
line naming the file, or in the right result; nothing complete is lost."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import devise  # noqa: F401
from devise.cli import main
from devise.errors import DeviseError
from devise.models.model import load_model_folder
from devise.serving.search import build_index, load_index, search
from devise.training.train import train

GLOVE = "glove-6b-50d"
NAMES = ["cat", "dog", "cup", "car"]


def _run(folder: Path, seed: int, epochs: int = 1):
    """A real (tiny) trained run folder: 4 GloVe classes, seeded features of the Lite0 feature width."""
    from devise.labels.vectors import embed_labels, load_vectors

    rng = np.random.default_rng(seed)
    vectors = embed_labels(NAMES, load_vectors(GLOVE)).matrix
    x = rng.standard_normal((32, 1280)).astype(np.float32)
    y = np.arange(32) % len(NAMES)
    return train("devise", x, y, NAMES, vectors, epochs=epochs, batch_size=8, seed=seed, verbose=0,
                 out_dir=folder, vectors_spec=GLOVE)


def test_a_run_folder_names_a_truncated_or_swapped_model_file(tmp_path):
    a, b = _run(tmp_path / "a", 0), _run(tmp_path / "b", 1)
    manifest = json.loads((a.path / "manifest.json").read_text())
    assert {"model.keras", "labels.npz", "settings.json", "history.json"} <= set(manifest["files"])
    np.testing.assert_array_equal(load_model_folder(a.path).model.get_weights()[0], a.model.get_weights()[0])

    shutil.copy(b.path / "model.keras", a.path / "model.keras")  # another run's model: used silently before
    with pytest.raises(DeviseError, match=r"a/model.keras: damaged or replaced"):
        load_model_folder(a.path)

    with open(b.path / "model.keras", "r+b") as fh:  # truncated: a 22-line "File not found" traceback before
        fh.truncate(fh.seek(0, 2) // 2)
    with pytest.raises(DeviseError, match=r"b/model.keras: damaged or replaced \(.* bytes, manifest.json says"):
        load_model_folder(b.path)
    (b.path / "manifest.json").unlink()  # a run saved before manifests: still one line
    with pytest.raises(DeviseError, match=r"b/model.keras: not a loadable Keras model") as caught:
        load_model_folder(b.path)
    assert "\n" not in str(caught.value)


def test_a_run_without_a_manifest_loads_as_before_and_save_writes_one(tmp_path):
    run = _run(tmp_path / "old", 0)
    (run.path / "manifest.json").unlink()
    loaded = load_model_folder(run.path)
    assert loaded.class_names == NAMES
    loaded.save(tmp_path / "copy")
    assert load_model_folder(tmp_path / "copy").class_names == NAMES
    assert json.loads((tmp_path / "copy" / "manifest.json").read_text())["files"]["model.keras"]["sha256"]


def test_a_damaged_checkpoint_is_said_and_training_starts_again(tmp_path):
    run = _run(tmp_path / "run", 0, epochs=2)
    for name in ("model.keras", "history.json", "manifest.json"):  # as if killed after its last checkpoint
        (run.path / name).unlink()
    with open(run.path / "checkpoint" / "arrays.npz", "r+b") as fh:
        fh.truncate(100)  # a BadZipFile traceback before
    with pytest.warns(UserWarning, match=r"checkpoint/arrays.npz: damaged .*training starts again"):
        again = _run(tmp_path / "run", 0, epochs=2)
    assert again.history["epochs_run"] == 2
    assert load_model_folder(run.path).class_names == NAMES


# ---------------------------------------------------------------- image indexes

@pytest.fixture(scope="module")
def photos(tmp_path_factory, foolbox_photos):
    """Six real photos at paths of this module's own (a feature cache of their own, cold on first use)."""
    root = tmp_path_factory.mktemp("photos")
    for src in foolbox_photos[:6]:
        shutil.copy(src, root / src.name)
    return root


def test_a_damaged_index_is_named_and_rebuilt(photos, tmp_path):
    out = tmp_path / "idx"
    built = np.array(build_index(photos, out=out, vectors=GLOVE, progress=False).embeddings)  # a copy: they are mapped
    embeddings = out / "embeddings-1.npy"
    rows = np.load(embeddings)
    rows[1] = np.nan  # same size: only a finiteness check sees it (search returned nothing before)
    np.save(embeddings, rows)
    with pytest.raises(DeviseError, match=r"embeddings-1.npy: damaged \(non-finite"):
        load_index(out)
    with pytest.warns(UserWarning, match="old index was unreadable"):
        rebuilt = build_index(photos, out=out, vectors=GLOVE, progress=False)
    np.testing.assert_allclose(rebuilt.embeddings, built, rtol=1e-5, atol=1e-6)
    assert search(out, text="dog")["results"]

    with open(out / "index-2.faiss", "r+b") as fh:
        fh.truncate(64)
    with pytest.raises(DeviseError, match=r"index-2.faiss: damaged or replaced \(64 bytes, meta.json says"):
        load_index(out)


def test_non_finite_embeddings_never_enter_an_index(photos, tmp_path):
    run = _run(tmp_path / "run", 0)
    run.model.set_weights([np.full_like(w, np.nan) for w in run.model.get_weights()])  # a broken model
    run.save(tmp_path / "nan-run")
    with pytest.raises(DeviseError, match=r"imagenet_.*: its embedding is not finite"):
        build_index(photos, model=tmp_path / "nan-run", out=tmp_path / "idx", progress=False)
    assert not (tmp_path / "idx" / "meta.json").exists()


@pytest.mark.slow
def test_two_index_builds_into_one_folder_from_cold_both_complete(foolbox_photos, tmp_path):
    """Two real `devise index` processes, same images (never embedded before) and same --out, at once."""
    images = tmp_path / "images"
    images.mkdir()
    for src in foolbox_photos[6:12]:
        shutil.copy(src, images / src.name)
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "devise.cli", "index", str(images), "--out", str(out), "--vectors", GLOVE]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    index = load_index(out)
    assert len(index) == 6 and np.isfinite(index.embeddings).all()
    assert sorted(p.name for p in out.iterdir()) == ["embeddings-2.npy", "index-2.faiss", "meta.json"]


# ---------------------------------------------------------------- full disks

@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (skipped where this machine does not let a test mount one), unmounted after."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def _fill(disk: Path) -> None:
    """Fill the disk up: every later write there fails with ENOSPC."""
    with open(disk / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 16))
                fh.flush()
        except OSError:
            pass


def _one_error_line(err: str, *patterns) -> None:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("devise: error:")]
    assert len(lines) == 1, err[-3000:]
    for pattern in patterns:
        assert pattern in lines[0], lines[0]


@pytest.mark.slow
def test_index_and_train_on_a_full_disk_say_one_line_and_keep_the_earlier_result(photos, photo_folder,
                                                                                   small_disk, capsys):
    out = small_disk / "idx"
    first = sorted(photos.iterdir())[:3]
    assert main(["index", *map(str, first), "--out", str(out), "--vectors", GLOVE]) == 0
    _fill(small_disk)
    capsys.readouterr()
    assert main(["index", str(photos), "--out", str(out), "--vectors", GLOVE]) == 2
    _one_error_line(capsys.readouterr().err, str(out / "embeddings-2.npy"), "no space left on device")
    assert len(load_index(out)) == 3  # the earlier index is kept
    assert sorted(p.name for p in out.iterdir()) == ["embeddings-1.npy", "index-1.faiss", "meta.json"]

    assert main(["train", str(photo_folder), "--out", str(small_disk / "run"), "--epochs", "1",
                 "--vectors", GLOVE]) == 2
    _one_error_line(capsys.readouterr().err, str(small_disk / "run"), "no space left on device")
    leftovers = [p.name for p in (small_disk / "run").rglob("*") if ".tmp" in p.name] \
        if (small_disk / "run").exists() else []
    assert not leftovers


@pytest.mark.slow
def test_features_with_the_data_home_on_a_full_disk_say_one_line(photo_folder, small_disk, tmp_path):
    """It died with SIGBUS (exit 135, no message): a memory-mapped write into a sparse file on a full disk."""
    home = small_disk / "home"
    home.mkdir()
    _fill(small_disk)
    env = {**os.environ, "DEVISE_HOME": str(home), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax")}
    result = subprocess.run([sys.executable, "-m", "devise.cli", "features", str(photo_folder)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    _one_error_line(result.stderr, str(home), "no space left on device")
    assert not list(home.rglob("*.npy"))


def test_wordnet_on_a_full_data_home_still_loads(small_disk, monkeypatch):
    """Its pickle cache is an optimisation: a full disk costs speed, never the answer."""
    from devise.assets import wordnet_dir
    from devise.labels.wordnet import _load

    monkeypatch.setenv("DEVISE_HOME", str(small_disk / "home"))
    _fill(small_disk)
    _load.cache_clear()
    try:
        assert _load.__wrapped__(str(wordnet_dir().resolve())).name("n02084071")
    finally:
        _load.cache_clear()


def test_a_damaged_fine_tuning_checkpoint_is_said_and_not_half_restored(tmp_path):
    """finetune's per-epoch checkpoint.npz truncated on disk: a BadZipFile traceback before."""
    import keras

    from devise.training.finetune import _load_finetune_checkpoint, _write_finetune_checkpoint

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    options = {"blocks": 2}
    _write_finetune_checkpoint(tmp_path, options, model, {"epoch": 1, "loss": [0.5]})
    assert _load_finetune_checkpoint(tmp_path, options, model)["epoch"] == 1
    before = [np.array(w) for w in model.get_weights()]
    with open(tmp_path / "checkpoint.npz", "r+b") as fh:
        fh.truncate(fh.seek(0, 2) - 200)
    with pytest.warns(UserWarning, match=r"checkpoint.npz: damaged checkpoint .*fine-tuning starts again"):
        assert _load_finetune_checkpoint(tmp_path, options, model) == {"epoch": 0, "loss": []}
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_damaged_emoji_class_list_is_not_taken_for_a_built_benchmark(tmp_path, monkeypatch):
    """classes.json cut short in a built benchmark: a JSON traceback on every dataset load before; now the
    benchmark counts as not built (setup-assets, or the next load, builds it again with a warning)."""
    from devise.assets import data_home
    from devise.data.emoji import built_problem, is_built
    from devise.storage import file_entries

    built = data_home() / "emoji"
    home = tmp_path / "home"
    (home / "emoji").mkdir(parents=True)
    shutil.copy(built / "classes.json", home / "emoji" / "classes.json")
    manifest = json.loads((built / "manifest.json").read_text())
    manifest["files"] = file_entries(home / "emoji", ["classes.json"])
    (home / "emoji" / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("DEVISE_HOME", str(home))
    assert is_built()
    with open(home / "emoji" / "classes.json", "r+b") as fh:
        fh.truncate(1000)
    assert not is_built()
    assert "classes.json: damaged or replaced (1,000 bytes" in built_problem()


RESUME_ON_A_FULL_DISK = """
import sys
import numpy as np
from pathlib import Path
from devise.errors import DeviseError
from devise.storage import ChunkedArrays
folder, shape = Path(sys.argv[1]) / "cache", (20, 1000, 1000)   # 80 MB of float32, sparse until written
if sys.argv[2] == "start":  # what a run killed after its first chunk leaves (sparse: open_memmap's)
    partial = folder.with_name("cache.partial")
    partial.mkdir(parents=True)
    array = np.lib.format.open_memmap(partial / "features.npy", "w+", "float32", shape)
    array[0] = 1.0
    array.flush()
    (partial / "done.json").write_text("[0]")
    sys.exit(0)
try:
    cache = ChunkedArrays(folder, {"features": shape}, {"features": "float32"}, 20)  # resumes chunk 0
    for i in range(1, 20):
        cache.arrays["features"][i] = 1.0
        cache.arrays["features"].flush()
except DeviseError as exc:
    print(exc)
    sys.exit(2)
"""


def test_a_resumed_feature_cache_on_a_nearly_full_disk_is_one_line_not_sigbus(tmp_path):
    """A resumed .partial cache's unwritten chunks are holes the free-space check cannot see: with 70 MB free
    (above its 64 MB margin) filling them died with SIGBUS; the files are given their blocks first now."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(mount)], capture_output=True,
                          text=True) if shutil.which("mount") else None
    if made is None or made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = [sys.executable, "-c", RESUME_ON_A_FULL_DISK, str(mount)]
        assert subprocess.run([*run, "start"], capture_output=True, text=True, timeout=120).returncode == 0
        with open(mount / "filler", "wb") as fh:  # leave 70 MB free
            fh.write(b"\0" * (shutil.disk_usage(mount).free - (70 << 20)))
        result = subprocess.run([*run, "resume"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
        assert "features.npy: cannot write (no space left on device)" in result.stdout
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def test_a_vectors_file_converted_on_a_full_data_home_is_one_line_not_sigbus(small_disk, tmp_path, monkeypatch):
    """Its matrix.npy is a memory map: written into a sparse file on a full disk it would die of SIGBUS."""
    from devise.labels.vectors import load_vectors

    text = tmp_path / "vectors.txt"
    rng = np.random.default_rng(0)
    text.write_text("".join(f"word{i} " + " ".join(f"{v:.4f}" for v in rng.standard_normal(50)) + "\n"
                            for i in range(2000)))
    home = small_disk / "home"
    home.mkdir()
    monkeypatch.setenv("DEVISE_HOME", str(home))
    _fill(small_disk)
    with pytest.raises(DeviseError, match="no space left on device") as error:
        load_vectors(str(text))
    assert "matrix.npy" in str(error.value) and "\n" not in str(error.value)
