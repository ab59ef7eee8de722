"""ONNX export of the default preset: export time, parity, size, and onnxruntime's CPU throughput of the
image model against today's Keras-JAX CPU path (DeviseModel.encode_images: shifted depthwise, XLA).

    .venv/bin/python benchmarks/export.py [--repeats 5] [--batches 1 8 16 32 64] [--no-shifted]

Both paths get 2 threads (onnxruntime intra-op threads; XLA on this 2-core machine uses both) and the
same 64 real images; per batch size the median of `repeats` timed runs (after one warm-up), in rounds
that time every path at every batch back to back, so they share the machine's load; each path's best
batch is compared (goal >= 1.4x).
onnxruntime runs as devise.models.export.onnx_session configures it (idle threads sleep) and, for comparison,
with onnxruntime's default of spinning idle threads (much slower when the cores are shared).
Unless --no-shifted, the image graph is also exported from the shifted-depthwise form (what a plain
trace of today's CPU model gives) to show why the export builds grouped convolutions.
Prints RESULT lines and writes benchmarks/results/export.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "export.json"


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up (compilation, allocation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_rates(paths: dict, batches, images: np.ndarray, repeats: int) -> dict:
    """{path: {batch: images/s}}: median of `repeats` rounds, each round timing every path at every batch
    back to back, so a change of the machine's load falls on all of them alike. paths: name -> run(x)."""
    inputs = {batch: np.resize(images, (batch, *images.shape[1:])) for batch in batches}
    for run in paths.values():
        for x in inputs.values():
            run(x)  # warm-up (compilation, allocation)
    times = {name: {batch: [] for batch in batches} for name in paths}
    for _ in range(repeats):
        for batch, x in inputs.items():
            for name, run in paths.items():
                start = time.perf_counter()
                run(x)
                times[name][batch].append(time.perf_counter() - start)
    return {name: {batch: batch / statistics.median(t) for batch, t in by_batch.items()}
            for name, by_batch in times.items()}


def shifted_graph(model, folder: Path, images: np.ndarray, threads: int, batch: int, repeats: int) -> dict:
    """The image graph traced from the shifted-depthwise backbone (today's CPU model): nodes and speed."""
    import jax
    import onnx

    from devise.models.backbones import load_backbone
    from devise.models.export import image_forward, onnx_session, write_onnx

    shifted = load_backbone(model.backbone_name, depthwise="shifted", precision="float32")
    size = shifted.image_size
    path = folder / "shifted.onnx"
    write_onnx(image_forward(model, shifted.features_model, shifted.classifier),
               [jax.ShapeDtypeStruct(("B", size, size, 3), np.uint8)], ["images"], path)
    session = onnx_session(path, threads)
    x = images[:batch]
    seconds = median_seconds(lambda: session.run(None, {"images": x}), repeats)
    return {"nodes": len(onnx.load(str(path), load_external_data=False).graph.node),
            "batch": batch, "images_per_s": batch / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="conse")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-shifted", action="store_true")
    args = parser.parse_args()

    import onnx

    import devise
    from devise.models.export import default_check_images, onnx_session
    from devise.data.images import load_images

    model = devise.load(args.model)
    images, _ = load_images(default_check_images(), model.backbone.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = model.export(Path(tmp) / "onnx")  # the default vocabulary (WordNet), cached in the data home
        export_s = time.perf_counter() - start
        manifest = json.loads((out / "manifest.json").read_text())
        session = onnx_session(out / "image.onnx", args.threads)
        spinning = onnx_session(out / "image.onnx", args.threads, spinning=True)
        graph = onnx.load(str(out / "image.onnx"), load_external_data=False).graph
        nodes, op_types = len(graph.node), dict(Counter(n.op_type for n in graph.node).most_common())
        rates = interleaved_rates({"onnx": lambda x: session.run(None, {"images": x}),
                                   "spinning": lambda x: spinning.run(None, {"images": x}),
                                   "keras": model.encode_images}, args.batches, images, args.repeats)
        onnx_rate, spin_rate, keras_rate = rates["onnx"], rates["spinning"], rates["keras"]
        for batch in args.batches:
            print(f"batch {batch:3d}: onnxruntime {onnx_rate[batch]:6.1f} img/s (spinning {spin_rate[batch]:6.1f}), "
                  f"Keras-JAX {keras_rate[batch]:6.1f} img/s", flush=True)
        best_onnx, best_keras = max(onnx_rate, key=onnx_rate.get), max(keras_rate, key=keras_rate.get)
        best_spin = max(spin_rate, key=spin_rate.get)
        shifted = None if args.no_shifted else \
            shifted_graph(model, Path(tmp), images, args.threads, best_onnx, args.repeats)
    result = {
        "model": args.model, "threads": args.threads, "repeats": args.repeats,
        "machine": "2 CPU cores shared with other jobs (figures are medians; ratios measured in one process)",
        "export_s": round(export_s, 1), "parity": manifest["parity"], "sizes": manifest["sizes"],
        "image_graph_nodes": nodes, "image_graph_op_types": op_types, "onnx_images_per_s": onnx_rate,
        "onnx_spinning_images_per_s": spin_rate, "keras_images_per_s": keras_rate,
        "best": {"onnx_batch": best_onnx, "keras_batch": best_keras, "spinning_batch": best_spin,
                 "ratio": onnx_rate[best_onnx] / keras_rate[best_keras],
                 "spinning_ratio": spin_rate[best_spin] / keras_rate[best_keras]},
        "shifted_graph": shifted, "versions": manifest["versions"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"RESULT export_s {result['export_s']}")
    for what, figures in manifest["parity"].items():
        print(f"RESULT parity_{what}_max_abs {figures['max_abs']:.2e}")
        print(f"RESULT parity_{what}_same_top5 {figures['same_top5']}/{figures['count']}")
    print(f"RESULT image_size_ratio {manifest['sizes']['ratio']}  (onnx {manifest['sizes']['image_onnx_bytes']} B, "
          f"keras {manifest['sizes']['keras_weights_bytes']} B)")
    print(f"RESULT onnx_images_per_s {onnx_rate[best_onnx]:.1f}  (batch {best_onnx}, {nodes} nodes)")
    print(f"RESULT keras_images_per_s {keras_rate[best_keras]:.1f}  (batch {best_keras})")
    print(f"RESULT throughput_ratio {result['best']['ratio']:.2f}")
    print(f"RESULT onnx_spinning_images_per_s {spin_rate[best_spin]:.1f}  (batch {best_spin}; onnxruntime's default)")
    print(f"RESULT throughput_ratio_spinning {result['best']['spinning_ratio']:.2f}")
    if shifted:
        print(f"RESULT shifted_graph_images_per_s {shifted['images_per_s']:.1f}  (batch {shifted['batch']}, "
              f"{shifted['nodes']} nodes)")


if __name__ == "__main__":
    main()
