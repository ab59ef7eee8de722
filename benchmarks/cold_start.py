"""Cold start: a whole `devise predict IMAGE` (defaults: ConSE over ImageNet-1K, the WordNet vocabulary)
in a fresh process with a warm data home, against a fresh process that only imports Keras and JAX.

    .venv/bin/python benchmarks/cold_start.py [--runs 3] [--image PATH]

One unmeasured `devise predict` first warms the data home (vocabulary, class vectors, compiled programs);
then the two kinds of process alternate, so both see the same machine load. Prints the medians and
RESULT {"predict_one_s", "import_s", "ratio"} with ratio = predict_one_s / import_s (1.0 would mean
that predicting costs nothing beyond importing the frameworks), wall-clock medians, and the same three
in CPU seconds (user + system of the child: steadier than wall time on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPORT_ONLY = "import keras, jax, jax.numpy as jnp; jnp.ones(3).sum().block_until_ready()"


def devise_command() -> list[str]:
    script = Path(sys.executable).with_name("devise")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "devise.cli"]


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child): on a shared machine the CPU time is the steadier figure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def sample_image(folder: Path) -> Path:
    """skimage's chelsea as a JPEG (the README's example), else one of foolbox's photos."""
    path = folder / "chelsea.jpg"
    try:
        import skimage.data
        from PIL import Image

        Image.fromarray(skimage.data.chelsea()).save(path, quality=95)
        return path
    except ImportError:
        from devise.assets import foolbox_data_dir

        return sorted(foolbox_data_dir().glob("imagenet_*.jpg"))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image", type=Path)
    args = parser.parse_args()
    env = {**os.environ, "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "jax")}
    with tempfile.TemporaryDirectory() as tmp:
        image = args.image or sample_image(Path(tmp))
        predict = devise_command() + ["predict", str(image)]
        imports = [sys.executable, "-c", IMPORT_ONLY]
        timed(predict, env)  # warm the data home; not measured
        predict_runs, import_runs = [], []
        for _ in range(args.runs):
            predict_runs.append(timed(predict, env))
            import_runs.append(timed(imports, env))
    p, i = (statistics.median(w for w, _ in predict_runs), statistics.median(w for w, _ in import_runs))
    p_cpu, i_cpu = (statistics.median(c for _, c in predict_runs), statistics.median(c for _, c in import_runs))
    print("devise predict, wall / CPU (s):", " ".join(f"{w:.2f}/{c:.2f}" for w, c in predict_runs))
    print("import keras, jax, wall / CPU (s):", " ".join(f"{w:.2f}/{c:.2f}" for w, c in import_runs))
    print("RESULT " + json.dumps({"predict_one_s": round(p, 3), "import_s": round(i, 3), "ratio": round(p / i, 3),
                                  "predict_one_cpu_s": round(p_cpu, 3), "import_cpu_s": round(i_cpu, 3),
                                  "cpu_ratio": round(p_cpu / i_cpu, 3)}))


if __name__ == "__main__":
    main()
