"""The Ray engine on a local two-node Ray cluster (127.0.0.1, one CPU per node), real backbone, real images:
the same rows as in-process, a node lost mid-job, a killed driver resumed."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1 only (see local_cluster)
ray = pytest.importorskip("ray")

from devise.data import shards  # noqa: E402
from devise.models.model import load  # noqa: E402
from devise.data.ray_engine import embed_on_ray, local_cluster, remove_local_node  # noqa: E402
from devise.serving.search import build_index, search  # noqa: E402

# slow; and Ray's node start/stop forks from this (JAX) process only to exec its binaries
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")]


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of one CPU each, on 127.0.0.1; every process it started is stopped after."""
    with local_cluster(nodes=2, cpus_per_node=1) as cl:
        yield cl


@pytest.fixture(scope="module")
def images(tmp_path_factory, foolbox_photos):
    """48 real images in one folder (the 20 foolbox photos, 28 emoji of the benchmark with cats among them)
    and one unreadable file: 49 rows."""
    from devise.data.datasets import load_dataset

    dataset = load_dataset("emoji")
    cat = dataset.classes.index("cat face")
    emoji = [p for p, c in zip(dataset.paths, dataset.labels) if c == cat][:4] + list(dataset.paths[::200][:24])
    folder = tmp_path_factory.mktemp("images")
    for i, src in enumerate([*foolbox_photos, *emoji]):
        shutil.copy(src, folder / f"{i:03d}{os.path.splitext(src)[1]}")
    (folder / "025-broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")  # an unreadable file among them
    return sorted(str(p) for p in folder.iterdir())


@pytest.fixture(scope="module")
def reference(images):
    """The in-process embeddings of `images` (the default model): zero for the unreadable file."""
    with warnings.catch_warnings():  # warned about once, when its features were cached (maybe by another test)
        warnings.simplefilter("ignore")
        vectors, valid = load("conse").encode_paths(images, cache=True)
    assert (~valid).sum() == 1 and not vectors[~valid].any()
    return vectors


def _read(folder):
    parts = list(shards.read_shards(folder))
    return [p for paths, _, _ in parts for p in paths], np.concatenate([v for _, v, _ in parts])


def test_cluster_index_matches_in_process(cluster, images, tmp_path):
    with pytest.warns(UserWarning, match="025-broken.jpg"):
        here = build_index(os.path.dirname(images[0]), out=tmp_path / "here", progress=False)
    with pytest.warns(UserWarning, match="025-broken.jpg"):
        there = build_index(os.path.dirname(images[0]), out=tmp_path / "there", progress=False, ray=cluster.address)
    assert there.paths == here.paths and len(there) == len(images) - 1 and there.unreadable == here.unreadable
    np.testing.assert_allclose(there.embeddings, here.embeddings, atol=1e-5)
    assert not (tmp_path / "there" / "shards").exists()  # the index holds the embeddings now
    for query in ({"text": "cat"}, {"text": "musical instrument"}, {"image": images[3]}):
        assert search(there, top_k=5, **query)["results"] == search(here, top_k=5, **query)["results"]


def test_node_lost_mid_job_every_row_once(cluster, images, reference, tmp_path, fail_after):
    worker = next(n for n in cluster.worker_nodes)
    removed = []

    def remove_worker(done, total):  # on the driver's (main) thread, once the first rows are back
        if not removed and done < total:
            remove_local_node(cluster, worker)
            removed.append(done)

    try:
        with fail_after(300), pytest.warns(UserWarning, match="025-broken.jpg"):  # a hang after the loss: fail
            job = embed_on_ray(images, "conse", tmp_path / "shards", address=cluster.address, shard_rows=8,
                               batch_rows=4, actors=2, progress=False, on_rows=remove_worker)
    finally:
        if removed:
            cluster.add_node(num_cpus=1)  # back to two nodes for the next test
            cluster.wait_for_nodes()
    assert removed and removed[0] < len(images), "the node was not removed while the job ran"
    shards.check_complete(tmp_path / "shards")
    paths, vectors = _read(tmp_path / "shards")
    assert paths == images  # every row exactly once, in order
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    assert sorted(job.computed) == list(range(7)) and job.reused == []


def test_killed_driver_resumes(cluster, images, reference, tmp_path):
    folder = tmp_path / "shards"
    script = textwrap.dedent(f"""
        import sys, time
        from devise.data.ray_engine import embed_on_ray
        paths = sys.argv[1:]
        # slow the driver down so the kill lands mid-job: each batch back waits a second
        embed_on_ray(paths, "conse", {str(folder)!r}, address={cluster.address!r}, shard_rows=8, batch_rows=4,
                     actors=1, progress=False, on_rows=lambda done, total: time.sleep(1))
    """)
    driver = subprocess.Popen([sys.executable, "-c", script, *images], start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(folder.glob("shard-*.npz")):
            assert driver.poll() is None, "the driver ended before writing a shard"
            assert time.monotonic() < deadline, "no shard written in 240 s"
            time.sleep(0.05)
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    done = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in folder.glob("shard-*.npz")}
    assert 0 < len(done) < 7, f"the kill did not land mid-job ({len(done)} of 7 shards)"
    with warnings.catch_warnings():  # the unreadable file is warned about only if its shard is left to do
        warnings.simplefilter("ignore")
        job = embed_on_ray(images, "conse", folder, address=cluster.address, shard_rows=8, progress=False)
    assert sorted(shards.shard_name(k) for k in job.reused) == sorted(done)
    assert sorted(job.reused + job.computed) == list(range(7))
    for name, stamp in done.items():  # finished shards were kept, not written again
        f = folder / name
        assert (f.stat().st_ino, f.stat().st_mtime_ns) == stamp
    paths, vectors = _read(folder)
    assert paths == images
    np.testing.assert_allclose(vectors, reference, atol=1e-5)


def test_features_on_cluster_fill_the_same_cache(cluster, images):
    """devise features --ray: the feature cache of extract_features, the same numbers (an unreadable file
    among them), so training reads it unchanged."""
    from devise.data.features import extract_features
    from devise.data.ray_engine import extract_features_on_ray

    subset = images[20:32]
    with pytest.warns(UserWarning, match="025-broken.jpg"):
        here = extract_features(subset, "efficientnet_lite0", chunk_size=4, progress=False)
    features, logits, valid = np.array(here.features), np.array(here.logits), np.array(here.valid)
    shutil.rmtree(here.folder)  # the same images and backbone: the Ray run must fill this folder anew
    with pytest.warns(UserWarning, match="025-broken.jpg"):
        there = extract_features_on_ray(subset, "efficientnet_lite0", chunk_size=4, address=cluster.address,
                                        progress=False)
    assert there.folder == here.folder and (there.valid == valid).all() and (~valid).sum() == 1
    np.testing.assert_allclose(there.features[valid], features[valid], atol=1e-5)
    np.testing.assert_allclose(there.logits[valid], logits[valid], atol=1e-4)
