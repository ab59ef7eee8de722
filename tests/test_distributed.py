"""Several devices through Keras' distribution API: with the CPU split into 2 XLA devices, sharded feature
extraction and training give the single-device results (within float tolerance)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import devise, keras
    from devise import runtime
    from devise.backbones import load_backbone
    from devise.features import backbone_forward
    from devise.images import load_image
    from devise.train import train

    paths = sys.argv[1:9]
    images = np.stack([load_image(p, 224) for p in paths])
    shards = int(os.environ["SHARDS"])
    if shards > 1:
        assert runtime.use_devices(shards) is not None
    backbone = load_backbone("efficientnet_lite0")
    features, logits = backbone_forward(backbone)(images)
    sharding = str(getattr(features, "sharding", ""))
    features = np.asarray(features)

    rng = np.random.default_rng(0)
    x = np.concatenate([features] * 8) + rng.normal(0, 0.1, (64, features.shape[1])).astype("float32")
    y = np.arange(64) % 4
    vectors = rng.normal(size=(4, 16)).astype("float32")
    run = train("devise", x, y, ["a", "b", "c", "d"], vectors, loss="hinge", head="linear", truncated=False,
                epochs=3, batch_size=16, seed=0, verbose=0, patience=100)
    np.savez(os.environ["OUT"], features=features, logits=np.asarray(logits),
             weights=run.model.get_weights()[0], sharding=sharding)
""")


@pytest.mark.slow
def test_two_devices_match_one(tmp_path, foolbox_photos):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    results = {}
    for shards in (1, 2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", SHARDS=str(shards),
                   OUT=str(tmp_path / f"out{shards}.npz"), DEVISE_HOME=str(tmp_path / "home"))
        proc = subprocess.run([sys.executable, str(script)] + [str(p) for p in foolbox_photos[:8]],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[shards] = dict(np.load(tmp_path / f"out{shards}.npz"))
    assert "batch" in str(results[2]["sharding"])  # the batch really was split across the 2 devices
    for key in ("features", "logits", "weights"):
        a, b = results[1][key], results[2][key]
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max()), key
