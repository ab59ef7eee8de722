"""The feature cache on real photos and the real EfficientNet-Lite0: reuse, staleness, corrupt files, kill and resume."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from devise.models.backbones import load_backbone
from devise.errors import DeviseError
from devise.data.features import backbone_forward, build_image_store, extract_features
from devise.runtime import cached_forward
from devise.data.images import load_image


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVISE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_features_match_direct_forward_and_are_reused(home, foolbox_photos):
    paths = [str(p) for p in foolbox_photos[:6]]
    fs = extract_features(paths, "efficientnet_lite0", chunk_size=4, batch_size=4, progress=False)
    assert fs.features.shape == (6, 1280) and fs.logits.shape == (6, 1000) and fs.valid.all()
    bb = load_backbone("efficientnet_lite0")
    direct = np.asarray(bb.features_model.predict_on_batch(np.stack([load_image(p, 224) for p in paths])))
    np.testing.assert_allclose(fs.features, direct, rtol=1e-4, atol=1e-4)
    again = extract_features(paths, "efficientnet_lite0", chunk_size=4, batch_size=4, progress=False)
    assert again.folder == fs.folder
    # A changed file makes a new key: the stale cache is not reused.
    changed = home / "copy.jpg"
    shutil.copy(paths[0], changed)
    other = extract_features([str(changed)] + paths[1:], "efficientnet_lite0", chunk_size=4, batch_size=4, progress=False)
    assert other.folder != fs.folder
    os.utime(changed, ns=(1, 1))
    assert extract_features([str(changed)] + paths[1:], "efficientnet_lite0", chunk_size=4, batch_size=4, progress=False).folder != other.folder



def test_backbone_forward_is_the_cached_forward_of_one_model(home, foolbox_photos):
    """features + logits in one compiled program, kept on the backbone's forward_model (built once)."""
    bb = load_backbone("efficientnet_lite0")
    images = np.stack([load_image(p, 224) for p in foolbox_photos[:4]])
    features, logits = backbone_forward(bb)(images)
    assert bb.forward_model is bb.forward_model
    assert cached_forward(bb.forward_model) is cached_forward(bb.forward_model)
    np.testing.assert_allclose(np.asarray(features), bb.features_model.predict_on_batch(images), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits), bb.classifier.predict_on_batch(np.asarray(features)),
                               rtol=1e-4, atol=1e-3)


def test_features_from_a_prebuilt_store_match_the_pipelined_run(home, foolbox_photos, tmp_path):
    paths = [str(p) for p in foolbox_photos[:7]] + [str(tmp_path / "missing.jpg")]
    with pytest.warns(UserWarning, match="missing.jpg"):
        piped = extract_features(paths, "efficientnet_lite0", chunk_size=3, batch_size=2, progress=False)  # decode overlaps forward
    assert piped.valid.tolist() == [True] * 7 + [False]
    shutil.rmtree(home / "features")
    build_image_store(paths, 224, chunk_size=5, progress=False)  # the store exists: read, not decoded
    stored = extract_features(paths, "efficientnet_lite0", chunk_size=3, batch_size=2, progress=False)
    np.testing.assert_allclose(stored.features, piped.features, rtol=1e-6, atol=1e-6)
    assert stored.valid.tolist() == piped.valid.tolist()
    # The cache keeps its own valid mask: the (large) image store can be deleted once features exist.
    shutil.rmtree(home / "images")
    again = extract_features(paths, "efficientnet_lite0", chunk_size=3, batch_size=2, progress=False)
    assert again.folder == stored.folder and again.valid.tolist() == piped.valid.tolist()
    assert not (home / "images").exists()

def test_corrupt_image_is_skipped_with_one_warning(home, foolbox_photos, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths = [str(foolbox_photos[0]), str(bad), str(foolbox_photos[1])]
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\): .*broken.jpg"):
        images, valid, _ = build_image_store(paths, 224, workers=1, progress=False)
    assert valid.tolist() == [True, False, True]
    assert images[1].max() == 0 and images[0].max() > 0



def test_processes_decode_the_same_store_as_threads(home, foolbox_photos, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    paths = [str(p) for p in foolbox_photos[:20]] + [str(bad)] + [str(p) for p in foolbox_photos[:19]]
    with pytest.warns(UserWarning, match="broken.png"):
        threads, valid_t, _ = build_image_store(paths, 64, chunk_size=24, workers=2, progress=False)
    threads = np.array(threads)
    shutil.rmtree(home / "images")
    with pytest.warns(UserWarning, match="broken.png"):
        processes, valid_p, _ = build_image_store(paths, 64, chunk_size=24, workers=2, decode="processes",
                                                  progress=False)
    assert valid_p.tolist() == valid_t.tolist() and valid_p.sum() == 39 and not valid_p[20]
    np.testing.assert_array_equal(processes, threads)
    assert processes[:20].reshape(20, -1).max(axis=1).min() > 0  # every decoded row was written
    with pytest.raises(DeviseError, match="decode must be one of auto, threads, processes, gpu"):
        build_image_store(paths[:3], 64, decode="fibers")


@pytest.mark.slow
def test_features_cli_resumes_after_sigkill(home, foolbox_photos, tmp_path):
    root = tmp_path / "tree"
    for copy in range(4):  # 80 real photos, 10 chunks of 8
        for p in foolbox_photos:
            cls = root / f"class{int(p.stem.split('_')[-1]) % 4}"
            cls.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, cls / f"{copy}_{p.name}")
    cmd = [sys.executable, "-m", "devise.cli", "features", str(root), "--chunk-size", "8", "--batch-size", "8"]
    env = dict(os.environ, DEVISE_HOME=str(home))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill as soon as the first feature chunk is on disk
        done = list(home.glob("features/*/*.partial/done.json"))
        if done and done[0].read_text() not in ("", "[]"):
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "resuming features:" in out.stdout + out.stderr
    resumed = np.load(next(home.glob("features/*/*/features.npy")))
    shutil.rmtree(home / "features")
    clean = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    fresh = np.load(next(home.glob("features/*/*/features.npy")))
    np.testing.assert_allclose(resumed, fresh, rtol=1e-5, atol=1e-5)


def test_two_processes_extracting_one_folder_leave_one_complete_cache(home, foolbox_photos, tmp_path):
    """Two real processes asked for the same features at once: one computes, the other waits for its lock
    and reads the result; neither destroys the finished cache (it used to end as a folder with meta.json only)."""
    paths = [str(p) for p in foolbox_photos[:10]]
    code = ("import sys, numpy as np; from devise.data.features import extract_features; "
            f"fs = extract_features({paths!r}, 'efficientnet_lite0', chunk_size=4, batch_size=4, progress=False); "
            "np.save(sys.argv[1], np.asarray(fs.features))")
    env = dict(os.environ, DEVISE_HOME=str(home))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"{i}.npy")], env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    first, second = np.load(tmp_path / "0.npy"), np.load(tmp_path / "1.npy")
    np.testing.assert_array_equal(first, second)
    again = extract_features(paths, "efficientnet_lite0", chunk_size=4, batch_size=4, progress=False)
    np.testing.assert_array_equal(np.asarray(again.features), first)
    assert not list(home.glob("features/*/*.partial")) and not list(home.glob("images/*.partial"))


def test_damaged_feature_cache_is_said_and_recomputed(home, foolbox_photos):
    paths = [str(p) for p in foolbox_photos[:5]]
    fs = extract_features(paths, "efficientnet_lite0", chunk_size=4, batch_size=4, progress=False)
    good = np.array(fs.features)
    folder = fs.folder
    del fs
    with open(folder / "features.npy", "r+b") as fh:  # truncated (a crash of another tool, a full disk)
        fh.truncate(1000)
    with pytest.warns(UserWarning, match=r"damaged cache .*features.npy"):
        again = extract_features(paths, "efficientnet_lite0", chunk_size=4, batch_size=4, progress=False)
    np.testing.assert_allclose(np.asarray(again.features), good, rtol=1e-5, atol=1e-5)

    logits = np.load(folder / "logits.npy")  # NaN rows with the right size: caught by the finite check
    logits[2] = np.nan
    del again
    np.save(folder / "logits.npy", logits)
    with pytest.warns(UserWarning, match="logits.npy has non-finite values"):
        third = extract_features(paths, "efficientnet_lite0", chunk_size=4, batch_size=4, progress=False)
    assert np.isfinite(np.asarray(third.logits)).all()


def test_damaged_image_store_is_said_and_rebuilt(home, foolbox_photos):
    paths = [str(p) for p in foolbox_photos[:5]]
    images, _, folder = build_image_store(paths, 64, progress=False)
    good = np.array(images)
    del images
    with open(folder / "images.npy", "r+b") as fh:
        fh.truncate(500)
    with pytest.warns(UserWarning, match=r"damaged cache .*images.npy"):
        rebuilt, valid, _ = build_image_store(paths, 64, progress=False)
    np.testing.assert_array_equal(np.asarray(rebuilt), good)
    assert valid.all()
