"""Several devices and hosts through Keras' distribution API. With the CPU split into 2 XLA devices,
sharded feature extraction and training give the single-device results (within float tolerance); two
processes joined as two hosts (one CPU device each, gloo collectives, each decoding its share of every
batch) give the 2-device results."""
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import devise, keras
    from devise import defaults, runtime
    from devise.models.backbones import load_backbone
    from devise.data.features import backbone_forward, extract_features
    from devise.data.images import load_image
    from devise.training.train import train

    paths = sys.argv[1:9]
    images = np.stack([load_image(p, 224) for p in paths])
    shards = int(os.environ["SHARDS"])
    if os.environ.get("MULTI_HOST"):
        assert runtime.use_devices(multi_host=True) is not None
        assert runtime.process_index_and_count()[1] == 2 and runtime.device_count() == 2
    elif shards > 1:
        assert runtime.use_devices(shards) is not None
    backbone = load_backbone(defaults.BACKBONE)
    features, logits = backbone_forward(backbone)(images)
    sharding = str(getattr(features, "sharding", ""))
    features = np.asarray(features)
    # the feature cache, a corrupt file among the images; across hosts each decodes its share of each batch
    cached = extract_features(paths + [sys.argv[9]], backbone, batch_size=4, chunk_size=5, progress=False)

    # 64 rows in batches of 16, plus EXTRA rows in a short last batch (cut to a multiple of the devices)
    rows = 64 + int(os.environ.get("EXTRA", "0"))
    rng = np.random.default_rng(0)
    x = np.concatenate([features] * 9)[:rows] + rng.normal(0, 0.1, (rows, features.shape[1])).astype("float32")
    y = np.arange(rows) % 4
    vectors = rng.normal(size=(4, 16)).astype("float32")
    run = train("devise", x, y, ["a", "b", "c", "d"], vectors, loss="hinge", head="linear", truncated=False,
                epochs=3, batch_size=16, seed=0, verbose=0, patience=100, val=(x[:9], y[:9]))
    np.savez(os.environ["OUT"], features=features, logits=np.asarray(logits), weights=run.model.get_weights()[0],
             embedded=run.embed(x[:9]), val_hit1=run.history["val_hit@1"], sharding=sharding,
             cached=cached.features, cached_valid=cached.valid,
             image_store=(devise.data_home() / "images").exists())
""")


def _run(tmp_path, photos, name, extra_env, *, wait=True):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "OUT": str(tmp_path / f"{name}.npz"), "DEVISE_HOME": str(tmp_path / f"home-{name}"), **extra_env}
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py")] + [str(p) for p in photos[:8]] + [str(broken)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _finish(proc, tmp_path, name) if wait else (proc, name)


def _finish(proc, tmp_path, name):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return dict(np.load(tmp_path / f"{name}.npz"))


def _assert_close(a, b, keys=("features", "logits", "weights", "embedded", "val_hit1", "cached")):
    assert a["cached_valid"].tolist() == b["cached_valid"].tolist() == [True] * 8 + [False]
    for key in keys:
        assert np.abs(a[key] - b[key]).max() <= 1e-4 * max(1.0, np.abs(a[key]).max()), key


@pytest.mark.slow
def test_two_devices_match_one(tmp_path, foolbox_photos):
    (tmp_path / "run.py").write_text(SCRIPT)
    one = _run(tmp_path, foolbox_photos, "one", {"SHARDS": "1"})
    two = _run(tmp_path, foolbox_photos, "two", {"SHARDS": "2"})
    assert "batch" in str(two["sharding"])  # the batch really was split across the 2 devices
    _assert_close(one, two)


@pytest.mark.slow
def test_two_hosts_match_two_devices(tmp_path, foolbox_photos):
    (tmp_path / "run.py").write_text(SCRIPT)
    # 65 rows: the last batch of 1 is cut to 0 rows on 2 devices, whether on one host or two.
    two = _run(tmp_path, foolbox_photos, "two", {"SHARDS": "2", "EXTRA": "1"})
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    hosts = [_run(tmp_path, foolbox_photos, f"host{i}", {
        "SHARDS": "2", "EXTRA": "1", "MULTI_HOST": "1", "XLA_FLAGS": "",  # one CPU device per process
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"localhost:{port}", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
        "KERAS_DISTRIBUTION_PROCESS_ID": str(i), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}, wait=False)
        for i in range(2)]
    assert two["image_store"]
    for proc, name in hosts:
        result = _finish(proc, tmp_path, name)
        _assert_close(two, result)
        assert not result["image_store"]  # each host decoded only its share: no full store
