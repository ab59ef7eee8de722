"""The `devise` command: argument parsing only; every command calls the Python API.

Heavy imports (Keras, JAX) happen inside the handlers so `devise --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

from devise import defaults
from devise.errors import DeviseError
from devise.models.export import EXPORT_FORMATS
from devise.models.presets import DEFAULT_MODEL, PRESETS, list_presets
from devise.training.train import HEADS, LOSSES, METHODS, OPTIMIZERS


# ANSI escape sequences (colours, cursor moves) and backspaces: noise once output goes to a file or pipe.
_TERMINAL_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]|\x08")
MAX_MESSAGE = 600  # characters of an error or warning shown; a garbled file must not flood the terminal


def printable(text: str, limit: int = MAX_MESSAGE) -> str:
    """One line of text safe to print: control characters and other unprintables repr-escaped
    (binary garbage from a file shows as \\x00, never raw), cut to `limit` characters."""
    text = " ".join(str(text).splitlines())  # one line
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _PlainStream:
    """A stream that drops terminal control sequences: for stdout/stderr redirected to a file or pipe
    (Keras' progress bar writes colour codes even then)."""

    def __init__(self, stream):
        self._stream = stream
        self.at_line_start = True  # False mid-line (e.g. a progress bar redrawn with \r)

    def write(self, text):
        text = _TERMINAL_CONTROL.sub("", text)
        if text:
            self.at_line_start = text.endswith("\n")
        return self._stream.write(text)

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """warnings.showwarning for the CLI: one line, no source excerpt (the user did not write that code)."""
    file = file or sys.stderr
    start = "" if getattr(file, "at_line_start", True) else "\n"  # not glued to a progress bar's line
    print(f"{start}devise: warning: {printable(message)}", file=file, flush=True)


CONSE_VECTORS_HELP = ("label space of a preset model: minilm, glove-6b-50d or a vectors file (default: the "
                      "preset's own); a run folder uses its own")
MODEL_HELP = (f"a model preset ({', '.join(list_presets('model'))}; default %(default)s, no training) or a run "
              "folder made by 'devise train'")
RAY_HELP = ("run on a Ray cluster: 'auto' (this machine's, else a local one) or its address (HOST:6379); needs "
            "pip install -e '.[ray]'")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=None if isinstance(obj, list) else 2))


# ---------------------------------------------------------------- handlers (one per command)

def cmd_doctor(args) -> int:
    from devise.doctor import run_doctor
    return run_doctor()


def cmd_setup_assets(args) -> int:
    from devise.data.datasets import prepare_assets
    prepare_assets()
    return 0


def cmd_features(args) -> int:
    from devise.data.datasets import load_dataset
    from devise.data.features import extract_features

    dataset = load_dataset(args.dataset)
    if args.ray is not None:
        from devise.data.ray_engine import extract_features_on_ray

        fs = extract_features_on_ray(dataset, args.backbone, chunk_size=args.chunk_size, address=args.ray)
    else:
        fs = extract_features(dataset, args.backbone, batch_size=args.batch_size, chunk_size=args.chunk_size,
                              decode=args.decode)
    print(f"{int(fs.valid.sum())} of {len(fs.paths)} images -> features {fs.features.shape} "
          f"{'+ ImageNet logits ' if fs.logits is not None else ''}in {fs.folder}")
    return 0


def cmd_classify(args) -> int:
    from devise.models.classify import classify
    from devise.serving.predict import format_predictions

    results = classify(args.images, backbone=args.backbone, top_k=args.top, weights=args.weights)
    if args.json:
        for result in results:  # one JSON object per image per line
            print(json.dumps(result))
    else:
        print(format_predictions(results, score_format="{:6.1%}"))  # probabilities
    return 0


def _read_labels(source: str) -> list[str]:
    """Labels from a file (one per line) or a built-in list: imagenet1k (names) or imagenet1k-wnids."""
    if source in ("imagenet1k", "imagenet1k-wnids"):
        from devise.assets import imagenet1k_classes
        key = "wnid" if source.endswith("wnids") else "name"
        return [c[key] for c in imagenet1k_classes()]

    from devise.labels.vocabulary import read_label_lines  # binary garbage -> an error with an escaped excerpt
    return [line.strip() for line in read_label_lines(Path(source)) if line.strip()]


def cmd_vectors_info(args) -> int:
    from devise.labels.vectors import embed_labels, load_vectors

    vectors = load_vectors(args.spec, format=args.format)
    size = f"{len(vectors)} words" if hasattr(vectors, "__len__") else "sentence encoder (any phrase)"
    print(f"{vectors.name}: {size} x {vectors.dim}")
    if args.labels:
        emb = embed_labels(_read_labels(args.labels), vectors, drop_missing=True)
        print(emb.coverage_report())
        if args.verbose:
            for label, source in zip(emb.labels, emb.source):
                print(f"  {label}\t{source}")
    return 0


def cmd_vectors_corpus(args) -> int:
    from devise.labels.skipgram import build_corpus

    _print_json(build_corpus(args.out, sources=tuple(args.sources.split(",")), max_lines=args.max_lines))
    return 0


def cmd_vectors_train(args) -> int:
    from devise.labels.skipgram import train_skipgram

    vectors = train_skipgram(args.corpus, args.out, dim=args.dim, window=args.window, epochs=args.epochs,
                             min_count=args.min_count, workers=args.workers, seed=args.seed)
    print(f"{args.out}: {len(vectors)} words x {vectors.dim}")
    return 0


# ---------------------------------------------------------------- predict / index / search / serve (issue 5)

def cmd_predict(args) -> int:
    from devise.serving.predict import format_predictions, predict

    results = predict(args.images, model=args.model, vocab=args.vocab, top_k=args.top, hubness=args.hubness,
                      reference=args.reference, progress=len(args.images) > 1 or not args.json,
                      drop_missing=args.drop_missing, vectors=args.vectors, min_confidence=args.min_confidence)
    if args.json:
        for result in results:
            print(json.dumps(result))
    else:
        print(format_predictions(results))
    return 0


def cmd_export(args) -> int:
    from devise.models.model import load

    out = load(args.model, args.vectors).export(args.out, format=args.format, vocab=args.vocab,
                                                 check_images=args.check_images, overwrite=args.overwrite,
                                                 max_abs=args.max_abs)
    print(f"exported {args.model} to {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0

def cmd_index(args) -> int:
    from devise.serving.search import build_index

    if not args.folders and args.shards is None:
        raise DeviseError("give image folders to index, or --shards FOLDER of embedded rows")
    index = build_index(args.folders or None, model=args.model, out=args.out, vectors=args.vectors,
                        memory_cap=args.memory_cap, shards=args.shards, ray=args.ray)
    recall = f", recall@10 {index.recall['recall@10']:.3f} against exact" if index.recall and \
        not index.recall.get("exact") else ""
    print(f"{args.out}: {len(index)} images ({index.kind} index{recall}, model {index.model}); "
          f"{len(index.added)} embedded now, {len(index.removed)} removed, {len(index.unreadable)} unreadable")
    return 0


def cmd_search(args) -> int:
    from devise.serving.search import format_results, search

    if (args.text is None) == (args.image is None):
        raise DeviseError("give a text query or --image PATH (exactly one)")
    result = search(args.index, text=args.text, image=args.image, top_k=args.top)
    print(json.dumps(result) if args.json else format_results(result))
    return 0


def cmd_serve(args) -> int:
    from devise.serving.serve import serve

    serve(model=args.model, index=args.index, vocab=args.vocab, host=args.host, port=args.port,
          max_upload_mb=args.max_upload_mb, drop_missing=args.drop_missing, vectors=args.vectors)
    return 0


def cmd_train(args) -> int:
    from devise.training.train import train_dataset, training_summary

    options = {k: v for k, v in {"loss": args.loss, "head": args.head, "epochs": args.epochs,
                                  "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                                  "optimizer": args.optimizer, "patience": args.patience, "T": args.T,
                                  "margin": args.margin, "temperature": args.temperature,
                                  "ensemble": args.ensemble}.items()
               if v is not None}
    if args.normalize_output:
        options["normalize_output"] = True
    if args.full_sum:
        options["truncated"] = False
    # Keras' progress bar redraws one line with \r and colours: only for a terminal; else a line per epoch.
    run = train_dataset(args.dataset, args.method, preset=args.preset, out_dir=args.out, vectors=args.vectors,
                        backbone=args.backbone, seed=args.seed, drop_missing=args.drop_missing,
                        holdout_unseen=args.holdout_unseen, verbose=1 if sys.stdout.isatty() else 2, **options)
    print(training_summary(run))
    return 0


def cmd_evaluate(args) -> int:
    from devise.evaluation.evaluate import evaluate_run, metrics_table

    result = evaluate_run(args.run_dir, args.dataset)
    for group, values in result.items():
        print(f"\n{group}")
        print(metrics_table({"run": values}, list(values)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def cmd_finetune(args) -> int:
    from devise.training.finetune import finetune_run

    run = finetune_run(args.run_dir, args.out, blocks=args.blocks, epochs=args.epochs,
                       learning_rate=args.learning_rate, batch_size=args.batch_size,
                       max_images=args.max_images, seed=args.seed)
    print(f"fine-tuned run written to {run.path} (blocks: {', '.join(run.settings['finetune']['blocks'])}); "
          f"evaluate it with: devise evaluate {run.path}")
    return 0


def cmd_benchmark(args) -> int:
    from devise.evaluation.benchmark import run_benchmark

    report = run_benchmark(args.dataset, seeds=args.seeds, vectors=args.vectors, backbone=args.backbone,
                           out_dir=args.out, methods=args.methods.split(",") if args.methods else None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(f"\nwrote {args.out}/report.md, metrics.json, hit_at_k.png, risk_coverage.png, unseen_grid.png ({report['seconds']:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devise", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, metavar="N",
                        help="shard batches over N devices (keras.distribution.DataParallel; default: one)")
    parser.add_argument("--multi-host", action="store_true",
                        help="join the other hosts first (keras.distribution.initialize; set "
                             "KERAS_DISTRIBUTION_JOB_ADDRESSES, _NUM_PROCESSES and _PROCESS_ID)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("doctor", help="show which assets, backend and devices were found")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("setup-assets", help="fetch and build the offline assets into the data home")
    p.set_defaults(func=cmd_setup_assets)

    p = sub.add_parser("features", help="cache backbone features for a dataset (emoji or a class-per-folder tree)")
    p.add_argument("dataset", help="'emoji' or a folder with one sub-folder per class")
    p.add_argument("--backbone", default=defaults.TRAIN_BACKBONE, help="one of list_backbones() (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 2 per device on CPU, 256 on GPU")
    p.add_argument("--chunk-size", type=int, default=512, help="images per resumable chunk")
    p.add_argument("--decode", choices=("auto", "threads", "processes", "gpu"), default="auto",
                   help="auto (default): JPEGs on the GPU where nvImageCodec and CUDA are there, else the faster "
                        "CPU mode here (processes from 4 cores); or threads / processes, one per core")
    p.add_argument("--ray", metavar="ADDRESS", default=None, help=RAY_HELP)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("evaluate", help="the paper's metrics for one trained run folder")
    p.add_argument("run_dir")
    p.add_argument("dataset", nargs="?", help="default: the dataset the run was trained on")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("finetune", help="fine-tune a run's backbone top blocks end to end from images (GPU advised)")
    p.add_argument("run_dir", help="a run folder written by devise train")
    p.add_argument("--out", required=True, help="the new run folder (must not exist)")
    p.add_argument("--blocks", type=int, default=2, help="backbone blocks to train, from the top (default 2: "
                   "EfficientNet-Lite0's head conv and last MBConv block)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-images", type=int, help="a seeded random subset of the training images (quick trials)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("benchmark", help="every method on the zero-shot benchmark, tables + report + plots")
    p.add_argument("dataset", nargs="?", default=defaults.BENCHMARK, help="'emoji' (default) or a class-per-folder tree")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--vectors", default=defaults.VECTORS, help="label vectors: minilm, glove-6b-50d or a vectors file (default %(default)s)")
    p.add_argument("--backbone", default=defaults.TRAIN_BACKBONE, help="one of list_backbones() (default %(default)s)")
    p.add_argument("--methods", help="comma-separated subset of the methods: " + ", ".join(list_presets("recipe")))
    p.add_argument("--json", metavar="FILE", help="also write metrics.json here")
    p.add_argument("--out", default="runs/benchmark-emoji", help="folder for report.md, metrics.json and plots")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("classify", help="ImageNet-1K top-k classes of image files (folders: their images)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--backbone", default=defaults.BACKBONE, help="one of list_backbones() (default %(default)s)")
    p.add_argument("--weights", default=None, help="weights file (resnet50: .h5/.keras or 'imagenet')")
    p.add_argument("--top", type=int, default=5, metavar="K", help="how many classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image per line")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("vectors", help="word vectors: inspect coverage, build a corpus, train skip-gram")
    vsub = p.add_subparsers(dest="vectors_command", required=True, metavar="ACTION")
    q = vsub.add_parser("info", help="size and dimension of a vectors spec, and coverage of a label list")
    q.add_argument("spec", nargs="?", default=defaults.VECTORS, help="minilm, glove-6b-50d or a vectors file (default %(default)s)")
    q.add_argument("--format", default="auto", help="auto (default), text, word2vec-bin, fasttext-bin")
    q.add_argument("--labels", help="labels file (one per line), imagenet1k or imagenet1k-wnids")
    q.add_argument("-v", "--verbose", action="store_true", help="print which token or lemma gave each label its vector")
    q.set_defaults(func=cmd_vectors_info)
    q = vsub.add_parser("corpus", help="write a small real corpus (1913 Webster's + WordNet glosses)")
    q.add_argument("--out", required=True, help="output text file")
    q.add_argument("--sources", default="gcide,wordnet", help="comma-separated: gcide, wordnet")
    q.add_argument("--max-lines", type=int, default=None, help="stop after this many lines")
    q.set_defaults(func=cmd_vectors_corpus)
    q = vsub.add_parser("train", help="train skip-gram vectors (hierarchical softmax) with gensim")
    q.add_argument("corpus", metavar="CORPUS.txt", help="text file, one tokenised sentence per line")
    q.add_argument("--out", required=True, help="output vectors file (word2vec binary if it ends in .bin, else text)")
    q.add_argument("--dim", type=int, default=100)
    q.add_argument("--window", type=int, default=10)
    q.add_argument("--epochs", type=int, default=5)
    q.add_argument("--min-count", type=int, default=5)
    q.add_argument("--workers", type=int, default=2)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_vectors_train)
    p = sub.add_parser("train", help="train softmax / DeViSE / random control / ConSE on cached features")
    p.add_argument("dataset", help="'emoji' (trains on its seen classes) or a folder with one sub-folder per class")
    p.add_argument("--preset", choices=[n for n, p in PRESETS.items() if "train" in p], default=None,
                   help="a training recipe (the benchmark's methods): its method, loss, head and options; "
                        "flags given explicitly win")
    p.add_argument("--method", choices=METHODS, default=None, help="default devise (or the preset's)")
    p.add_argument("--loss", choices=LOSSES, default=None,
                   help="DeViSE loss: hinge (the paper's, default), cosine (the Keras blog's), softmax "
                        "(cross-entropy over cosines to the training labels)")
    p.add_argument("--head", choices=HEADS, default=None, help="DeViSE head (default linear)")
    p.add_argument("--vectors", default=defaults.VECTORS, help="word vectors spec (see 'devise vectors info')")
    p.add_argument("--backbone", default=defaults.TRAIN_BACKBONE, help="one of list_backbones() (default %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="most epochs (early stopping on validation classes)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None)
    p.add_argument("--patience", type=int, default=None, help="epochs without validation gain before stopping")
    p.add_argument("--ensemble", type=int, default=None, metavar="K",
                   help="train K heads (seeds SEED + 1000 k) and average their unit outputs (devise method)")
    p.add_argument("--T", type=int, default=None, help="ConSE: top classes mixed (default 10)")
    p.add_argument("--margin", type=float, default=None, help="hinge rank loss margin (default 0.1, the paper's)")
    p.add_argument("--temperature", type=float, default=None,
                   help="softmax loss temperature (default 0.1, chosen on validation classes)")
    p.add_argument("--normalize-output", action="store_true",
                   help="hinge on the cosine of the projection (unit-length M v) instead of the raw dot product")
    p.add_argument("--full-sum", action="store_true",
                   help="hinge: sum over every violating negative (default: truncated at the first, as the paper)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the initialisation and the batches")
    p.add_argument("--drop-missing", action="store_true", help="drop classes with no word vector (reported)")
    p.add_argument("--holdout-unseen", type=float, default=None, metavar="FRACTION",
                   help="hold this fraction of the classes out as unseen, for zero-shot evaluation (default: "
                        "0.25 for emoji, the benchmark's split; 0 for a folder: train on all its classes)")
    p.add_argument("--out", required=True, help="run folder (resumes an interrupted run with the same settings)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="open-vocabulary labels for images (ConSE by default, or a trained run)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--vectors", default=None, help=CONSE_VECTORS_HELP)
    p.add_argument("--vocab", default="wordnet", help="wordnet (default), imagenet1k, or a FILE of labels")
    p.add_argument("--top", type=int, default=5, metavar="K", help="labels per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image per line")
    p.add_argument("--hubness", choices=("csls", "center"), default=None,
                   help="correct hubness with CSLS or per-label centring (reference: --reference or the images)")
    p.add_argument("--reference", default=None, metavar="INDEX",
                   help="image index whose images are the hubness reference set")
    p.add_argument("--drop-missing", action="store_true",
                   help="leave out labels of a --vocab FILE that have no word vector (reported)")
    p.add_argument("--min-confidence", type=float, default=None, metavar="P",
                   help="answer 'unknown' when the top label's probability is below P (default: the model's "
                        "threshold, chosen on validation data; 0: always name a label)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a model as ONNX files that run with onnxruntime and numpy alone")
    p.add_argument("model", metavar="MODEL", help=f"a model preset ({', '.join(list_presets('model'))}) or a run folder")
    p.add_argument("--format", default="onnx", choices=sorted(EXPORT_FORMATS), help="file format (default onnx)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist, or --overwrite)")
    p.add_argument("--vectors", default=None, help=CONSE_VECTORS_HELP)
    p.add_argument("--vocab", default="wordnet", help="vocabulary of labels.npy: wordnet (default), imagenet1k, a FILE")
    p.add_argument("--check-images", nargs="+", default=None, metavar="IMAGE",
                   help="image files or folders to check the export on (default: 64 of the data home's)")
    p.add_argument("--max-abs", type=float, default=None, metavar="D",
                   help="largest onnxruntime vs Keras difference the check accepts (default 1e-4)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("index", help="embed a folder of images into a FAISS search index (adds to an existing one)")
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="image folders or files")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--vectors", default=None, help=CONSE_VECTORS_HELP)
    p.add_argument("--out", required=True, metavar="INDEX", help="index folder")
    p.add_argument("--memory-cap", default=None, metavar="SIZE",
                   help="keep the index within SIZE (e.g. 2GB): exact while it fits, compressed IVF-PQ above")
    p.add_argument("--shards", default=None, metavar="FOLDER",
                   help="index the rows of a shard folder embedded elsewhere (its model) instead of images")
    p.add_argument("--ray", metavar="ADDRESS", default=None, help=RAY_HELP)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="search an image index by text or by an example image")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("text", nargs="?", default=None, help="text query (words or a phrase)")
    p.add_argument("--image", default=None, metavar="PATH", help="query by an example image")
    p.add_argument("--top", type=int, default=10, metavar="K")
    p.add_argument("--json", action="store_true", help='print {"query", "results": [{"image", "score"}]}')
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("serve", help="web page and JSON API for prediction and search")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--vectors", default=None, help=CONSE_VECTORS_HELP)
    p.add_argument("--index", default=None, help="image index for text search")
    p.add_argument("--vocab", default="wordnet", help="wordnet (default), imagenet1k, or a FILE")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default 10)")
    p.add_argument("--drop-missing", action="store_true",
                   help="leave out labels of a --vocab FILE that have no word vector (reported)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    streams = sys.stdout, sys.stderr
    # Colour codes only on a terminal: a redirected stream gets them stripped, whoever writes them.
    sys.stdout, sys.stderr = (s if s.isatty() else _PlainStream(s) for s in streams)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # restored on exit (main may run inside a test process)
        try:
            if args.devices or args.multi_host:
                from devise.runtime import use_devices

                use_devices(args.devices, multi_host=args.multi_host)
            return int(args.func(args) or 0)
        except DeviseError as exc:
            start = "" if getattr(sys.stderr, "at_line_start", True) else "\n"
            print(f"{start}devise: error: {printable(exc)}", file=sys.stderr)
            return 2
        except OSError as exc:  # one no write site turned into a DeviseError (a full disk, a permission): one line
            from devise.storage import os_error_line

            start = "" if getattr(sys.stderr, "at_line_start", True) else "\n"
            print(f"{start}devise: error: {printable(os_error_line(exc))}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("devise: interrupted", file=sys.stderr)
            return 130
        finally:
            sys.stdout, sys.stderr = streams


if __name__ == "__main__":
    sys.exit(main())
