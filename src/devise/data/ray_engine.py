"""The Ray engine: embed (or compute backbone features for) a collection on a Ray cluster, with Ray Data.

The work is the in-process one, split differently (clip-retrieval's shape, on Ray instead of Spark):
- the image list is cut into units planned before anything runs: the shards of devise.data.shards (embeddings),
  or the chunks of the feature cache (devise.data.features; `devise features --ray`); finished units of an
  earlier run are skipped, so a killed job resumes;
- the rows of the units still to do flow through Ray Data: decoded by CPU tasks (`map_batches` over
  devise.data.images.load_images: the project's one decode policy, the same bytes as in-process), then run
  through the model in a pool of actors that each hold it (`ActorPoolStrategy`, `num_gpus=1` per actor
  where the cluster has GPUs);
- the driver takes the rows as they stream back (a few KB each), keeps one copy of each row by its index,
  and writes a unit the moment its last row arrives, in ONE atomic write (shards.write_shard, or the feature
  cache's chunk through features.extract_features' `engine` hook: devise.storage's protocol). So no row is
  written twice, none is lost (a unit left incomplete is an error, never a short file), and the shard
  folder only needs to be reachable from the driver.
Failures are Ray's to absorb: Ray Data restarts a dead map actor (max_restarts=-1) and retries a failed task
(max_retries), and a node lost mid-job has its tasks run again elsewhere; a row seen twice is dropped
(counted in RayJob.duplicates).

Ray is imported only in this module, inside functions: the default install never needs it.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from devise import defaults

from devise.data import shards
from devise.errors import DeviseError

DECODE_ROWS = 32  # images per decoding task's batch
FORWARD_ROWS = 64  # images per actor call
INSTALL_HINT = "the Ray engine needs Ray: pip install -e '.[ray]'"


@dataclass
class RayJob:
    """What a Ray run did: units computed now and reused from an earlier run, rows Ray delivered twice
    (dropped), and the unreadable files ("PATH: why")."""

    computed: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    duplicates: int = 0
    unreadable: list[str] = field(default_factory=list)


def require_ray():
    """The ray module, or the one-line DeviseError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise DeviseError(INSTALL_HINT) from None
    return ray


def connect(address: str = "auto") -> bool:
    """Join the Ray cluster at `address` ("auto": the one this machine belongs to (`ray start`, or
    RAY_ADDRESS); when there is none, a single-machine Ray started for this job). True when this call
    started the connection (the caller shuts it down)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address == "auto":
        try:
            ray.init(address="auto", **kwargs)
        except ConnectionError:  # no cluster running: a local one, for this process only
            print("devise: no Ray cluster found here; starting a local one", file=sys.stderr, flush=True)
            ray.init(**kwargs)
    else:
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise DeviseError(f"cannot reach the Ray cluster at {address} ({exc})") from None
    return True


@contextmanager
def _connected(address: str, needed: bool = True):
    """Connected to Ray at `address` for the block (when `needed`), disconnected after if this opened it."""
    started = connect(address) if needed else False
    try:
        yield
    finally:
        if started:
            require_ray().shutdown()


class _Forward:
    """A Ray Data map actor holding the model: decoded rows in, vectors (or features and logits) out."""

    def __init__(self, model: str | None, vectors: str | None, backbone: str | None):
        from devise.models.backbones import load_backbone
        from devise.models.model import load

        self.model = load(model, vectors) if model is not None else None
        self.backbone = self.model.backbone if self.model is not None else load_backbone(backbone)

    def __call__(self, batch: dict) -> dict:
        from devise.data.features import forward_arrays

        features, logits = forward_arrays(self.backbone, batch["image"])  # extract_features' batches
        valid = batch["valid"]
        out = {"row": batch["row"], "valid": valid, "error": batch["error"]}
        if self.model is not None:
            vectors = self.model.encode_features(features, logits)
            vectors[~valid] = 0.0
            out["vector"] = vectors
        else:
            out["features"] = features
            if logits is not None:
                out["logits"] = logits
        return out


def _decode(batch: dict, size: int) -> dict:
    """A Ray Data task: paths -> uint8 images at the backbone's size, by the project's decode policy."""
    from devise.data.images import load_images

    errors: list[str] = []  # "PATH: why", one per unreadable file, in row order
    images, valid = load_images([str(p) for p in batch["path"]], size, workers=1, errors=errors)
    error = np.full(len(valid), "", dtype=object)
    error[~valid] = errors
    return {"row": batch["row"], "image": images, "valid": valid, "error": error}


def _resources(ray, actors, cpus_per_actor, gpus_per_actor) -> tuple[int, float, float]:
    """(pool size, CPUs, GPUs per actor): one actor per GPU where the cluster has GPUs, else one per node."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus_per_actor is None:
        gpus_per_actor = 1 if gpus else 0
    if actors is None:
        actors = max(1, gpus // max(1, int(gpus_per_actor))) if gpus_per_actor else \
            max(1, sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0))
    if cpus_per_actor is None:
        # CPU actors book a quarter CPU: the backend's threads use the node's cores whatever is booked, and
        # the rest stays free for decoding tasks, also when a lost node's actors restart on the survivors
        # (booking half a CPU, two actors restarted on a one-CPU node left none: decoding stopped, a hang).
        cpus_per_actor = 1.0 if gpus_per_actor else 0.25
    return int(actors), float(cpus_per_actor), float(gpus_per_actor)


def stream_units(paths: list[str], units: dict[int, tuple[int, int]], size: int, *, model=None, vectors=None,
                 backbone=None, actors=None, cpus_per_actor=None, gpus_per_actor=None,
                 decode_cpus: float = 0.5, batch_rows: int = FORWARD_ROWS, progress: bool = True, on_rows=None,
                 job: RayJob | None = None):
    """Yield (k, columns) for each unit k -> (first row, rows) of `units` once all its rows are back, rows
    in order; columns: "valid" and "vector" (model given) or "features" (+ "logits"). Needs `connect` first.
    on_rows(done, total): called after each batch comes back (progress, or a test removing a node)."""
    ray = require_ray()
    from ray.data import ActorPoolStrategy

    job = job if job is not None else RayJob()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours below counts rows; Ray's logs its state every few seconds
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    rows = [r for first, n in units.values() for r in range(first, first + n)]
    unit_of = {r: k for k, (first, n) in units.items() for r in range(first, first + n)}
    items = [{"row": r, "path": paths[r]} for r in rows]
    n_actors, cpus, gpus = _resources(ray, actors, cpus_per_actor, gpus_per_actor)
    decode_rows = min(DECODE_ROWS, batch_rows)
    blocks = max(1, -(-len(items) // decode_rows))
    n_actors = min(n_actors, blocks)  # no idle actors on a short rerun: each one loads the model
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    # Decoding stays in tasks of its own while its resources differ from the actors' (the defaults: 0.5
    # CPU against 0.25, or a GPU); with equal ones Ray Data fuses it into the actors. A task lost with its
    # worker or node runs again (Ray's default for tasks: 3 retries).
    ds = ds.map_batches(_decode, fn_kwargs={"size": size}, batch_size=decode_rows, num_cpus=decode_cpus,
                        batch_format="numpy")
    ds = ds.map_batches(_Forward, fn_constructor_kwargs={"model": model, "vectors": vectors, "backbone": backbone},
                        batch_size=batch_rows, compute=ActorPoolStrategy(size=n_actors), num_cpus=cpus,
                        num_gpus=gpus, batch_format="numpy")
    pending: dict[int, dict] = {}  # unit -> {"seen": bool (rows,), column: array}
    finished: set[int] = set()
    done = 0
    with tqdm(total=len(rows), desc="ray", unit="img", disable=not progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, row in enumerate(batch["row"].tolist()):
                k = unit_of[row]
                first, n = units[k]
                if k in finished:
                    job.duplicates += 1  # a retried task's row delivered again: keep the first
                    continue
                unit = pending.get(k)
                if unit is None:
                    unit = pending[k] = {"seen": np.zeros(n, bool)}
                    for col, value in batch.items():
                        if col not in ("row", "error"):
                            unit[col] = np.zeros((n,) + value.shape[1:], value.dtype)
                j = row - first
                if unit["seen"][j]:
                    job.duplicates += 1  # a retried task's row delivered again: keep the first
                    continue
                unit["seen"][j] = True
                for col in unit:
                    if col != "seen":
                        unit[col][j] = batch[col][i]
                if not batch["valid"][i]:
                    job.unreadable.append(str(batch["error"][i]))
                done += 1
                if unit["seen"].all():
                    del pending[k], unit["seen"]
                    finished.add(k)
                    yield k, unit
            bar.update(len(batch["row"]))
            if on_rows is not None:
                on_rows(done, len(rows))
    if pending or done != len(rows):
        raise DeviseError(f"the Ray job ended with {len(rows) - done} of {len(rows)} rows missing "
                          f"(units {sorted(pending)[:5]}); run it again to resume")


def _model_args(model) -> tuple[str, str]:
    """How an actor loads the same model: its name (a preset, or a run folder every node can read) and
    its vectors spec."""
    from devise.models.model import model_name

    return model_name(model), model.vectors_spec


def embed_on_ray(paths, model, shard_folder: str | os.PathLike, *, address: str = "auto",
                 shard_rows: int = shards.SHARD_ROWS, vectors: str | None = None, actors: int | None = None,
                 cpus_per_actor: float | None = None, gpus_per_actor: float | None = None,
                 batch_rows: int = FORWARD_ROWS, progress: bool = True, on_rows=None) -> RayJob:
    """Embed image files with `model` on a Ray cluster into `shard_folder` (devise.data.shards: shards.json,
    then one shard-NNNNN.npz per `shard_rows` rows as each completes). A rerun skips finished shards.

    address: "auto" (this machine's cluster, else a local Ray) or a cluster address ("ray://HOST:10001",
    "HOST:6379"). Every node must read the image paths (and a run folder model) at the same path.
    actors: model actors (default one per GPU, else one per node); on_rows(done, total) after each batch.
    """
    from devise.models.backbones import BACKBONES
    from devise.models.model import load

    require_ray()  # before any work: without Ray, one line saying how to install it
    paths = [str(p) for p in paths]
    model = load(model, vectors)
    model.check_open_vocabulary()
    plan = shards.plan_shards(paths, model, shard_folder, shard_rows)
    todo = shards.missing_shards(shard_folder)
    job = RayJob(reused=[k for k in range(len(plan["shards"])) if k not in todo])
    if not todo:
        return job
    units = {k: (plan["shards"][k]["first"], plan["shards"][k]["rows"]) for k in todo}
    name, spec = _model_args(model)
    with _connected(address):
        for k, unit in stream_units(paths, units, BACKBONES[model.backbone_name].image_size, model=name,
                                    vectors=spec, actors=actors, cpus_per_actor=cpus_per_actor,
                                    gpus_per_actor=gpus_per_actor, batch_rows=batch_rows, progress=progress,
                                    on_rows=on_rows, job=job):
            first, n = units[k]
            shards.write_shard(shard_folder, k, paths[first:first + n], unit["vector"], unit["valid"])
            job.computed.append(k)
    _warn_unreadable(job)
    return job


def _warn_unreadable(job: RayJob) -> None:
    if job.unreadable:
        warnings.warn(f"skipped {len(job.unreadable)} unreadable image(s): " + "; ".join(job.unreadable),
                      stacklevel=3)


def extract_features_on_ray(dataset_or_paths, backbone: str = defaults.TRAIN_BACKBONE, *, chunk_size: int = 512,
                            address: str = "auto", actors: int | None = None, progress: bool = True):
    """devise.data.features.extract_features computed on a Ray cluster: the same feature cache (features, ImageNet
    logits, valid per row; its folder, lock and publishing are extract_features' own), filled chunk by chunk
    by the cluster, so training and the benchmark read it unchanged; chunks finished by a killed run are
    kept. Decoded on the cluster by the CPU policy: no uint8 image store is written.
    backbone: a registered name (the actors load it by name). Returns the FeatureSet."""
    from devise.data.features import extract_features

    require_ray()
    if not isinstance(backbone, str):
        raise DeviseError("the Ray engine loads the backbone by name on every node: give a registered name")
    job = RayJob()

    def fill(paths, bb, arrays, chunks, mark_done):
        job.reused = [c for c in range(-(-len(paths) // chunk_size)) if c not in chunks]
        with _connected(address, bool(chunks)):
            for c, unit in stream_units(paths, chunks, bb.image_size, backbone=bb.name, actors=actors,
                                        progress=progress, job=job):
                first, rows = chunks[c]
                for col, array in arrays.items():
                    array[first:first + rows] = unit[col]
                mark_done(c)
                job.computed.append(c)

    # decode="threads": the CPU decode policy's key (the cluster's decoding tasks give its pixels).
    features = extract_features(dataset_or_paths, backbone, chunk_size=chunk_size, decode="threads",
                                progress=progress, engine=fill)
    _warn_unreadable(job)
    return features


# ---------------------------------------------------------------- a local multi-node cluster (tests, benchmark)

# A dead node is declared so after about a second (default: ~10 s), so a job notices a lost node fast.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300,
                      "health_check_timeout_ms": 300, "health_check_failure_threshold": 3}


@contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 1):
    """A Ray cluster of `nodes` nodes on this machine, every address on 127.0.0.1 (ray.cluster_utils.Cluster,
    its sockets under a short RAY_TMPDIR), shut down on exit with every process it started."""
    # Ray swaps a loopback address for the machine's network address unless this is off (its setting for
    # single-machine clusters on Windows/macOS), read when Ray is imported.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    own_tmp = "RAY_TMPDIR" not in os.environ
    if own_tmp:
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="/tmp/ray")  # socket paths <= 107 characters
    require_ray()
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus_per_node, "include_dashboard": False, "_system_config": FAST_HEALTH_CHECKS})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        _without_agents([cluster.head_node, *cluster.worker_nodes], cluster.shutdown)
        if own_tmp:
            shutil.rmtree(os.environ.pop("RAY_TMPDIR"), ignore_errors=True)


def remove_local_node(cluster, node) -> None:
    """Kill a node of a local_cluster as a crash would (no graceful drain)."""
    _without_agents([node], lambda: cluster.remove_node(node, allow_graceful=False))


def _without_agents(nodes, stop) -> None:
    """stop() (which ends `nodes`), then the agents their raylets started: they outlive them (Ray 2.60)."""
    raylets = {info.process.pid for node in nodes if node is not None
               for info in node.all_processes.get("raylet", [])}
    agents = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) in raylets:
                agents.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    stop()
    for pid in agents:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # Wait for them to be gone: one still exiting recreated an empty session folder under the RAY_TMPDIR
    # that local_cluster removes next (seen three times after a 5,000-image job).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(pid) for pid in [*agents, *raylets]):
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except (OSError, IndexError):
        return False
