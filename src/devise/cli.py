"""The `devise` command: argument parsing only; every command calls the Python API.

Heavy imports (Keras, JAX) happen inside the handlers so `devise --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys

from devise.errors import DeviseError


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=None if isinstance(obj, list) else 2))


# ---------------------------------------------------------------- handlers (one per command)

def cmd_doctor(args) -> int:
    from devise.doctor import run_doctor
    return run_doctor()


def cmd_setup_assets(args) -> int:
    from devise.datasets import prepare_assets
    prepare_assets()
    return 0


def cmd_features(args) -> int:
    from devise.datasets import load_dataset
    from devise.features import extract_features

    dataset = load_dataset(args.dataset)
    fs = extract_features(dataset, args.backbone, batch_size=args.batch_size, chunk_size=args.chunk_size)
    print(f"{int(fs.valid.sum())} of {len(fs.paths)} images -> features {fs.features.shape} "
          f"{'+ ImageNet logits ' if fs.logits is not None else ''}in {fs.folder}")
    return 0


def cmd_classify(args) -> int:
    from devise.classify import classify, format_table

    results = classify(args.images, backbone=args.backbone, top_k=args.top, weights=args.weights)
    if args.json:
        for result in results:  # one JSON object per image per line
            print(json.dumps(result))
    else:
        print(format_table(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devise", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("doctor", help="show which assets, backend and devices were found")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("setup-assets", help="fetch and build the offline assets into the data home")
    p.set_defaults(func=cmd_setup_assets)

    p = sub.add_parser("features", help="cache backbone features for a dataset (emoji or a class-per-folder tree)")
    p.add_argument("dataset", help="'emoji' or a folder with one sub-folder per class")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=512, help="images per resumable chunk")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("classify", help="ImageNet-1K top-k classes of image files")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--backbone", default="efficientnet_lite0", help="efficientnet_lite0 (default) or resnet50")
    p.add_argument("--weights", default=None, help="weights file (resnet50: .h5/.keras or 'imagenet')")
    p.add_argument("--top", type=int, default=5, metavar="K", help="how many classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image per line")
    p.set_defaults(func=cmd_classify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DeviseError as exc:
        print(f"devise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("devise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
