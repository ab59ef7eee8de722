"""Re-choose the devise_softmax_mlp recipe (ensemble size K, hidden size, patience) on validation data only
(issue 19), stage 1 of the benchmark (training classes -> validation classes), seeds 0-2.

Scored per variant and seed, the stage-1 ensemble (unit mean of K heads, seeds seed + 1000 k):
- zero-shot validation: hit@1 / hit@5 over the validation classes (what early stopping watches);
- seen validation: hit@1 / hit@5 of the training classes' held-out calibration style (openmoji, kept out
  of stage 1: `_calibration_holdout`) against the training classes' label vectors.
Variants: K in {2, 3, 4, 5} x hidden in {384, 512, 768, 1024} x patience in {4, 6, 8, 15}.
Rule (fixed before measuring): reference = hidden 1024, patience 15, K 5 (the recipe before issue 19).
Eligible: within 0.5 points of the reference on zero-shot hit@1 and hit@5 AND within 1.0 point on seen
hit@1 and hit@5 (means over the seeds). Choice: the eligible variant with the lowest estimated seconds of
both stages (below).

One patience-15 fit per (seed, member k, hidden) holds every smaller patience: the trajectory does not
depend on patience, so patience p stops at the first epoch p epochs past the best so far and restores that
best epoch. The member's embeddings of the validation and calibration images are kept at every new best
epoch, so every (K <= 5, patience <= 15) variant is scored exactly without refitting.
Cost of a variant (seconds, both stages, per seed): sum over its K members of stage-1 epochs x (train +
validation seconds per epoch) + stage-2 epochs (= the best epoch) x train seconds per epoch x (refit images
/ stage-1 images) + 2 x the fixed seconds per fit; each a median of this process's fits of that hidden
size (fits of all sizes interleaved, so a shared machine's load falls on all alike). head-epochs x hidden
is printed as a load-free proxy.

Prints one JSON line per fit ("fit") and per variant and seed ("variant"), the means ("mean") and a last
`RESULT recipe_sweep {...}` line with the choice. Needs the emoji features cached.
  python benchmarks/recipe_sweep.py [--seeds 0,1,2] [--hidden 384,512,768,1024] [--plot PATH.png]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import devise  # noqa: F401
from devise import defaults
from devise.data.datasets import load_dataset
from devise.data.features import extract_features
from devise.evaluation.benchmark import METHODS, seed_split
from devise.evaluation.evaluate import label_space, relabel
from devise.evaluation.metrics import flat_hit_at_k
from devise.labels.vectors import unit_rows
from devise.training.train import ENSEMBLE_SEED_STEP, train

REFERENCE = (5, 1024, 15)  # (K, hidden, patience): the recipe before issue 19
ZSL_TOLERANCE, SEEN_TOLERANCE = 0.5, 1.0  # points of hit@1 and hit@5 below the reference
KS, PATIENCES = (2, 3, 4, 5), (4, 6, 8, 15)


def seed_data(dataset, features, space, usable, seed):
    """Stage-1 arrays of one benchmark seed, from the benchmark's own split (benchmark.seed_split)."""
    split = seed_split(dataset, space, usable, seed)
    labels = np.asarray(dataset.labels)
    names_tr, vec_tr, _ = space.subset(split.train_classes)
    names_val, vec_val, _ = space.subset(split.val_classes)
    fit, cal, vi = split.fit_images, split.cal_seen, split.val_images
    return dict(x_fit=features[fit], y_fit=relabel(labels[fit], split.train_classes), names_tr=names_tr,
                vec_tr=unit_rows(vec_tr), x_val=features[vi], y_val=relabel(labels[vi], split.val_classes),
                vec_val=unit_rows(vec_val), names_val=names_val, x_cal=features[cal],
                y_cal=relabel(labels[cal], split.train_classes), refit_ratio=len(split.refit_images) / len(fit))


def fit_member(d, seed, k, hidden, options):
    """One patience-15 stage-1 member -> its per-epoch validation hit@5, the embeddings at each new best
    epoch, and timings."""
    import keras

    stored, times = {}, {"train": [], "epoch": []}
    best = [None]

    class Keep(keras.callbacks.Callback):  # runs after train()'s own validation (logs hold val_hit@5)
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = self.t_batch = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.t_batch = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            now = time.perf_counter()
            times["train"].append(self.t_batch - self.t0)
            times["epoch"].append(now - self.t0)
            score = logs["val_hit@5"]
            if best[0] is None or score > best[0]:
                best[0] = score
                stored[epoch + 1] = [unit_rows(np.asarray(self.model(x, training=False)))
                                     for x in (d["x_val"], d["x_cal"])]

    t = time.perf_counter()
    run = train("devise", d["x_fit"], d["y_fit"], d["names_tr"], d["vec_tr"],
                val=(d["x_val"], d["y_val"], d["vec_val"], d["names_val"]), seed=seed + ENSEMBLE_SEED_STEP * k,
                verbose=0, callbacks=[Keep()], **{**options, "hidden": hidden, "patience": max(PATIENCES)})
    wall = time.perf_counter() - t
    scores = run.history["val_hit@5"]
    assert stop_and_best(scores, max(PATIENCES)) == (run.history["epochs_run"], run.history["best_epoch"])
    epoch_s = float(np.median(times["epoch"]))  # the fixed part holds the first epoch's compilation too
    return dict(scores=scores, stored=stored, train_s=float(np.median(times["train"])), epoch_s=epoch_s,
                fixed_s=wall - len(scores) * epoch_s, wall=wall)


def stop_and_best(scores, patience):
    """(epochs run, best epoch) of train()'s early stopping with this patience on these scores."""
    best, best_epoch, wait = None, None, 0
    for epoch, score in enumerate(scores, 1):
        if best is None or score > best:
            best, best_epoch, wait = score, epoch, 0
        else:
            wait += 1
        if wait >= patience:
            return epoch, best_epoch
    return len(scores), best_epoch


def score_variant(d, members, K, patience):
    """Stage-1 ensemble of the first K members stopped with this patience -> metrics and epochs."""
    picks = [stop_and_best(m["scores"], patience) for m in members[:K]]
    val = unit_rows(np.mean([m["stored"][b][0] for m, (_, b) in zip(members, picks)], axis=0))
    cal = unit_rows(np.mean([m["stored"][b][1] for m, (_, b) in zip(members, picks)], axis=0))
    zsl = flat_hit_at_k(val @ d["vec_val"].T, d["y_val"], [1, 5])
    seen = flat_hit_at_k(cal @ d["vec_tr"].T, d["y_cal"], [1, 5])
    return {"zsl_hit1": 100 * zsl[1], "zsl_hit5": 100 * zsl[5], "seen_hit1": 100 * seen[1], "seen_hit5": 100 * seen[5],
            "stage1_epochs": sum(r for r, _ in picks), "stage2_epochs": sum(b for _, b in picks)}


def cost_seconds(v, timing, refit_ratio, K):
    return (v["stage1_epochs"] * timing["epoch_s"] + v["stage2_epochs"] * timing["train_s"] * refit_ratio
            + 2 * K * timing["fixed_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--hidden", default="384,512,768,1024")
    parser.add_argument("--plot", default=None, help="write the trade-off plot here (png)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    hiddens = [int(h) for h in args.hidden.split(",")]
    options = {k: v for k, v in METHODS["devise_softmax_mlp"].items()
               if k not in ("method", "hidden", "patience", "ensemble")}
    dataset = load_dataset(defaults.BENCHMARK)
    fs = extract_features(dataset, defaults.TRAIN_BACKBONE)
    features = np.asarray(fs.features, np.float32)
    space = label_space(dataset, defaults.VECTORS)
    usable = np.asarray(fs.valid) & space.has_vector[np.asarray(dataset.labels)]
    per_seed, fits = [], {h: [] for h in hiddens}
    for seed in seeds:
        d = seed_data(dataset, features, space, usable, seed)
        members = {h: [] for h in hiddens}
        for k in range(max(KS)):
            for h in hiddens:  # interleaved: load on the machine falls on every size alike
                m = fit_member(d, seed, k, h, options)
                members[h].append(m)
                fits[h].append(m)
                times = {key: round(m[key], 3) for key in ("train_s", "epoch_s", "fixed_s", "wall")}
                print(json.dumps({"fit": {"seed": seed, "member": k, "hidden": h, "epochs_run": len(m["scores"]),
                                          "best_epoch": stop_and_best(m["scores"], max(PATIENCES))[1], **times}}),
                      flush=True)
        rows = {}
        for h in hiddens:
            for K in KS:
                for p in PATIENCES:
                    rows[(K, h, p)] = score_variant(d, members[h], K, p)
                    print(json.dumps({"variant": {"seed": seed, "K": K, "hidden": h, "patience": p,
                                                  **{k: round(v, 2) for k, v in rows[(K, h, p)].items()}}}), flush=True)
        per_seed.append((rows, d["refit_ratio"]))
        del members
    timing = {h: {key: float(np.median([m[key] for m in fits[h]])) for key in ("train_s", "epoch_s", "fixed_s")}
              for h in hiddens}
    print(json.dumps({"timing_per_hidden": timing}), flush=True)
    means = {}
    for key in per_seed[0][0]:
        K, h, _ = key
        rows = [r[key] for r, _ in per_seed]
        means[key] = {m: float(np.mean([r[m] for r in rows])) for m in rows[0]}
        means[key]["cost_s"] = float(np.mean([cost_seconds(r[key], timing[h], ratio, K) for r, ratio in per_seed]))
        means[key]["head_epochs_x_hidden"] = float(np.mean([(r[key]["stage1_epochs"] + r[key]["stage2_epochs"]) * h
                                                            for r, _ in per_seed]))
    ref = means[REFERENCE]
    for key, v in sorted(means.items(), key=lambda kv: kv[1]["cost_s"]):
        v["eligible"] = bool(all(v[m] >= ref[m] - ZSL_TOLERANCE for m in ("zsl_hit1", "zsl_hit5"))
                             and all(v[m] >= ref[m] - SEEN_TOLERANCE for m in ("seen_hit1", "seen_hit5")))
        print(json.dumps({"mean": {"K": key[0], "hidden": key[1], "patience": key[2],
                                   **{m: round(x, 2) if isinstance(x, float) else x for m, x in v.items()},
                                   "cost_vs_reference": round(v["cost_s"] / ref["cost_s"], 3)}}), flush=True)
    chosen = min((k for k, v in means.items() if v["eligible"]), key=lambda k: means[k]["cost_s"])
    if args.plot:
        plot(means, chosen, args.plot)
    print("RESULT recipe_sweep " + json.dumps({
        "chosen": {"K": chosen[0], "hidden": chosen[1], "patience": chosen[2]},
        **{m: round(means[chosen][m], 2) for m in ("zsl_hit1", "zsl_hit5", "seen_hit1", "seen_hit5", "cost_s")},
        "reference": {m: round(ref[m], 2) for m in ("zsl_hit1", "zsl_hit5", "seen_hit1", "seen_hit5", "cost_s")},
        "cost_vs_reference": round(means[chosen]["cost_s"] / ref["cost_s"], 3), "seeds": seeds}))


def plot(means, chosen, path) -> None:
    """Estimated seconds (both stages) against seen and zero-shot validation hit@1, one point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, metric, tol in ((axes[0], "seen_hit1", SEEN_TOLERANCE), (axes[1], "zsl_hit1", ZSL_TOLERANCE)):
        for i, K in enumerate(KS):
            pts = [(v["cost_s"], v[metric], key) for key, v in means.items() if key[0] == K]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", label=f"K={K}",
                       marker="o", facecolors=[f"C{i}" if means[p[2]]["eligible"] else "none" for p in pts])
            for c, y, key in pts:
                ax.annotate(f"{key[1]}/{key[2]}", (c, y), fontsize=6, alpha=0.7)
        ax.axhline(means[REFERENCE][metric] - tol, color="gray", ls="--", lw=0.8, label=f"reference - {tol}")
        ax.scatter([means[chosen]["cost_s"]], [means[chosen][metric]], s=160, facecolors="none", edgecolors="red",
                   label="chosen")
        ax.set(xlabel="estimated seconds per seed, both stages", ylabel=f"{metric.replace('_', ' ')} (%)",
               title=("seen validation (held-out style)" if metric.startswith("seen") else "zero-shot validation")
               + ": hidden/patience, filled = eligible")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
