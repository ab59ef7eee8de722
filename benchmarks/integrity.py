"""Two concurrent `devise features` and two concurrent `devise index` runs of one folder (issue 20's goal:
20 trials, 20/20 complete, arrays identical to a single run).

Each trial copies the same small class-per-folder tree (N images of the emoji benchmark, two classes) to new
paths, so its feature cache and its index start cold, then starts two real CLI processes at once:
- `devise features TREE --backbone B`: both must exit 0, name the same cache folder, and that folder must be
  complete (its manifest checks) with features (and logits) equal to those of a single run on a reference copy;
- `devise index TREE2 --out IDX` (one --out for both, from cold): both must exit 0, and IDX must load with every
  image, its embeddings equal to a single run's.
The data home is the caller's (DEVISE_HOME): compiled programs are shared, the feature caches are new per trial.
Prints one RESULT line per measure; run it on a quiet machine or expect minutes per trial.

    PYTHONPATH=src python benchmarks/integrity.py --trials 20 --images 40
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import devise  # noqa: F401
from devise.assets import data_home
from devise.storage import check_manifest


def make_tree(root: Path, images: int) -> Path:
    """images PNGs of two emoji classes (one per style, then the next classes) as a class-per-folder tree."""
    home = data_home() / "emoji"
    classes = json.loads((home / "classes.json").read_text())
    picked = []
    for c in classes:
        for style in c["styles"]:
            picked.append((f"class{len(picked) * 2 // images}", home / "images" / style / f"{c['codepoint']}.png"))
        if len(picked) >= images:
            break
    for i, (label, src) in enumerate(picked[:images]):
        (root / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / label / f"{i:03d}.png")
    return root


def cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "devise.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def features_folder(stdout: str) -> Path | None:
    line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    return Path(line.split(" in ", 1)[1]) if " in " in line else None


def run_features(tree: Path, backbone: str, copies: int):
    procs = [cli("features", tree, "--backbone", backbone) for _ in range(copies)]
    outs = [p.communicate() for p in procs]
    return [p.returncode for p in procs], outs


def read_features(folder: Path) -> dict:
    check_manifest(folder, hashes=False)
    return {name: np.load(folder / f"{name}.npy") for name in ("features", "logits", "valid")
            if (folder / f"{name}.npy").exists()}


def run_index(tree: Path, out: Path, copies: int):
    procs = [cli("index", tree, "--out", out) for _ in range(copies)]
    outs = [p.communicate() for p in procs]
    return [p.returncode for p in procs], outs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    from devise.serving.search import load_index

    scratch = Path(tempfile.mkdtemp(prefix="devise-integrity-"))
    try:
        start = time.time()
        codes, outs = run_features(make_tree(scratch / "ref" / "tree", args.images), args.backbone, 1)
        if codes != [0]:
            raise SystemExit(f"single features run failed: {outs[0][1][-2000:]}")
        reference = read_features(features_folder(outs[0][0]))
        codes, outs = run_index(make_tree(scratch / "ref" / "tree2", args.images), scratch / "ref" / "idx", 1)
        if codes != [0]:
            raise SystemExit(f"single index run failed: {outs[0][1][-2000:]}")
        ref_index = load_index(scratch / "ref" / "idx")
        print(f"reference runs: {time.time() - start:.0f} s", flush=True)

        feat_ok = index_ok = 0
        for trial in range(args.trials):
            t0 = time.time()
            root = scratch / f"trial{trial}"
            codes, outs = run_features(make_tree(root / "tree", args.images), args.backbone, 2)
            folders = {features_folder(o[0]) for o in outs}
            why = ""
            if codes != [0, 0] or len(folders) != 1 or None in folders:
                why = f"exit codes {codes}: {' | '.join(o[1].strip().splitlines()[-1:][0] if o[1].strip() else '' for o in outs)}"
            else:
                try:
                    got = read_features(folders.pop())
                    same = got.keys() == reference.keys() and all(np.array_equal(got[k], reference[k]) for k in got)
                    why = "" if same else "arrays differ from the single run"
                except Exception as exc:  # noqa: BLE001 - a damaged cache is what this counts
                    why = f"{type(exc).__name__}: {exc}"
            feat_ok += not why
            feat_why = why or "ok"

            codes, outs = run_index(make_tree(root / "tree2", args.images), root / "idx", 2)
            why = ""
            if codes != [0, 0]:
                why = f"exit codes {codes}: {' | '.join(o[1].strip().splitlines()[-1:][0] if o[1].strip() else '' for o in outs)}"
            else:
                try:
                    index = load_index(root / "idx")
                    order = np.argsort([Path(p).relative_to(root / "tree2").as_posix() for p in index.paths])
                    ref_order = np.argsort([Path(p).relative_to(scratch / "ref" / "tree2").as_posix()
                                            for p in ref_index.paths])
                    if len(index) != args.images:
                        why = f"{len(index)} images in the index, not {args.images}"
                    elif not np.array_equal(index.embeddings[order], ref_index.embeddings[ref_order]):
                        why = "embeddings differ from the single run"
                except Exception as exc:  # noqa: BLE001
                    why = f"{type(exc).__name__}: {exc}"
            index_ok += not why
            print(f"trial {trial + 1}/{args.trials}: features {feat_why}; index {why or 'ok'} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            shutil.rmtree(root, ignore_errors=True)
        print(f"RESULT concurrent_features_complete_identical {feat_ok}/{args.trials}")
        print(f"RESULT concurrent_index_complete_identical {index_ok}/{args.trials}")
        print(f"RESULT seconds {time.time() - start:.0f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
