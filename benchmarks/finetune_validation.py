"""What `devise finetune` adds, measured on the emoji benchmark's VALIDATION classes only.

Per seed:
1. train_dataset("emoji", "devise", <the benchmark's devise_hinge_mlp settings>): on the emoji benchmark
   (25% unseen classes held out) this fits on the 80% *training* classes of the seen classes, with
   early stopping on zero-shot hit@5 of the 20% validation classes (no refit stage: the run's
   settings record train_classes and val_classes, validation "zero-shot").
2. finetune_run(run, blocks, epochs, max_images): the backbone's top blocks + the run's head, end to end
   from the run's own training images (training classes only; asserted disjoint from the validation
   classes).
3. Both runs score the validation classes' images zero-shot against the validation classes' label
   vectors. Both embed the same uint8 images (the decoded-once store) through their own backbone
   (DeviseModel.encode_images: the fine-tuned run uses backbone.weights.npz). The "before"
   scores are checked against the run's cached-feature scores and its recorded best validation hit@5.

Unseen classes and the seen-class test style are never read. Nothing is chosen here on any data:
blocks/epochs/max_images/learning rate are fixed on the command line.

Last line per seed: RESULT {"val_hit@1_before": .., "val_hit@5_before": .., "val_hit@1_after": ..,
"val_hit@5_after": .., "train_images": .., "epochs": .., "blocks": .., "seconds": ..}; with several
seeds a final RESULT_MEAN line.

    PYTHONPATH=src python benchmarks/finetune_validation.py --seeds 0 --blocks 2 --epochs 1 --max-images 512
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import devise  # noqa: F401  (KERAS_BACKEND=jax)
import numpy as np

# The benchmark's devise_hinge_mlp (chosen on validation classes): hinge on cosines, margin 0.3, full sum.
# Fine-tuning takes one backbone: Lite0 (the training default, Lite0 and Lite2 side by side, is refused).
RUN_SETTINGS = dict(loss="hinge", head="mlp", normalize_output=True, margin=0.3, truncated=False,
                    backbone="efficientnet_lite0")


def unit(m):
    m = np.asarray(m, np.float32)
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def validation_data(run):
    """(uint8 images, labels into val_classes, image indices, class-vector matrix, dataset) of the run's
    validation classes, rebuilt from its recorded split."""
    from devise import defaults
    from devise.data.datasets import load_dataset, validation_split, zero_shot_split
    from devise.data.features import build_image_store, extract_features
    from devise.training.train import VALIDATION_FRACTION, class_label_vectors
    from devise.labels.vectors import load_vectors

    s = run.settings
    assert s["validation"] == "zero-shot" and s.get("stage") != "refit", s["validation"]
    dataset = load_dataset(s["dataset"])
    split_seed = int(s["split_seed"])
    split = zero_shot_split(dataset, seed=split_seed, unseen_fraction=float(s["unseen_fraction"]))
    val = validation_split(split, seed=split_seed, fraction=VALIDATION_FRACTION)
    matrix, kept, _ = class_label_vectors(dataset, load_vectors(s["vectors"]), texts=s.get("class_texts", "one"))
    val_classes = np.asarray(s["val_classes"], np.int64)
    train_classes = np.asarray(s["train_classes"], np.int64)
    assert set(val_classes.tolist()) == {int(c) for c in val.val_classes if kept[c]}
    assert not set(val_classes.tolist()) & set(train_classes.tolist())
    assert not set(val_classes.tolist()) & set(np.asarray(split.unseen_classes).tolist())
    labels = np.asarray(dataset.labels)
    position = np.full(len(dataset.classes), -1)
    position[val_classes] = np.arange(len(val_classes))
    fs = extract_features(dataset, s.get("backbone") or defaults.BACKBONE, progress=False)  # cached
    idx = np.asarray([i for i in val.val if fs.valid[i] and position[labels[i]] >= 0], np.int64)
    assert not np.isin(idx, split.unseen).any() and not np.isin(idx, split.seen_test).any()
    store, valid, _ = build_image_store(list(dataset.paths), 224, progress=False)
    assert np.asarray(valid, bool)[idx].all()
    images = np.asarray(store[idx])
    return images, position[labels[idx]], idx, unit(matrix[val_classes]), np.asarray(fs.features[idx], np.float32)


def hits(emb, y, class_vectors):
    from devise.evaluation.metrics import flat_hit_at_k

    h = flat_hit_at_k(unit(emb) @ class_vectors.T, y, (1, 5))
    return h[1], h[5]


def one_seed(seed, args, work: Path):
    from devise.training.finetune import finetune_run, training_images
    from devise.models.model import load_model_folder
    from devise.training.train import train_dataset

    t0 = time.perf_counter()
    run_dir, ft_dir = (work / f"seed{seed}" / "run",
                      work / f"seed{seed}" / (f"finetuned-b{args.blocks}-e{args.epochs}-m{args.max_images}"
                                             f"-lr{args.learning_rate:g}"))
    run = train_dataset("emoji", "devise", seed=seed, out_dir=run_dir, verbose=0, **RUN_SETTINGS)
    t_train = time.perf_counter() - t0
    print(f"seed {seed}: run trained in {t_train:.0f} s on {run.settings['num_train']} images of "
          f"{len(run.settings['train_classes'])} training classes; vectors {run.settings['vectors']}; "
          f"best epoch {run.history['best_epoch']}, recorded best validation hit@5 "
          f"{run.history.get('best_val_hit@5', run.history)}", flush=True)

    images, y, idx, class_vectors, cached = validation_data(run)
    _, train_idx, _ = training_images(run.settings)
    assert not np.isin(train_idx, idx).any()  # fine-tuning never sees a validation image
    print(f"validation: {len(y)} images of {len(class_vectors)} classes (chance hit@5 "
          f"{5 / len(class_vectors):.3f}); fine-tuning pool: {len(train_idx)} training images", flush=True)

    before = load_model_folder(run_dir).encode_images(images)
    hb1, hb5 = hits(before, y, class_vectors)
    cb1, cb5 = hits(run.embed(cached), y, class_vectors)
    print(f"before: hit@1 {hb1:.4f} hit@5 {hb5:.4f} (from the cached features: {cb1:.4f} / {cb5:.4f}; "
          f"max |emb diff| {np.abs(before - run.embed(cached)).max():.2e})", flush=True)

    t1 = time.perf_counter()
    if (ft_dir / "settings.json").is_file():  # finished by an earlier call with the same --work
        ft = load_model_folder(ft_dir)
    else:
        ft = finetune_run(run_dir, ft_dir, blocks=args.blocks, epochs=args.epochs,
                          learning_rate=args.learning_rate, batch_size=args.batch_size,
                          max_images=args.max_images, seed=seed, verbose=args.verbose)
    t_ft = time.perf_counter() - t1
    print(f"fine-tuned {ft.settings['finetune']['blocks']} on {ft.settings['finetune']['images']} images, "
          f"{args.epochs} epoch(s), lr {args.learning_rate:g}, batch {args.batch_size}: {t_ft:.0f} s; "
          f"loss per epoch {ft.history['finetune_loss']}", flush=True)

    assert "finetuned" in ft.backbone.cache_key
    after = ft.encode_images(images)
    ha1, ha5 = hits(after, y, class_vectors)
    # Which half moved the needle: the fine-tuned head on the ORIGINAL backbone's features.
    hh1, hh5 = hits(ft.embed(cached), y, class_vectors)
    print(f"after:  hit@1 {ha1:.4f} hit@5 {ha5:.4f}  (fine-tuned head on the pretrained backbone's "
          f"features: {hh1:.4f} / {hh5:.4f})", flush=True)
    result = {"seed": seed, "val_hit@1_before": round(hb1, 4), "val_hit@5_before": round(hb5, 4),
              "val_hit@1_after": round(ha1, 4), "val_hit@5_after": round(ha5, 4),
              "val_images": int(len(y)), "val_classes": int(len(class_vectors)),
              "train_images": int(ft.settings["finetune"]["images"]), "epochs": args.epochs,
              "blocks": args.blocks, "learning_rate": args.learning_rate, "batch_size": args.batch_size,
              "vectors": run.settings["vectors"], "finetune_seconds": round(t_ft, 1),
              "seconds": round(time.perf_counter() - t0, 1)}
    print("RESULT " + json.dumps(result), flush=True)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-images", type=int, default=512)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--work", default=None, help="folder for the runs (default: a new temporary folder)")
    p.add_argument("--verbose", type=int, default=2)
    args = p.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="finetune-validation-"))
    print(f"runs in {work}", flush=True)
    results = [one_seed(seed, args, work) for seed in args.seeds]
    if len(results) > 1:
        keys = ["val_hit@1_before", "val_hit@5_before", "val_hit@1_after", "val_hit@5_after"]
        print("RESULT_MEAN " + json.dumps({k: round(float(np.mean([r[k] for r in results])), 4) for k in keys}
                                          | {"seeds": args.seeds}), flush=True)


if __name__ == "__main__":
    main()
