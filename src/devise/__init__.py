"""devise: DeViSE, the Deep Visual-Semantic Embedding model (Frome et al., NeurIPS 2013), on Keras 3.

The public Python API is re-exported here (imported lazily, so `import devise` stays fast and Keras
starts only when a model is needed); the `devise` command is a thin layer over it (devise/cli.py).
"""
import importlib
import os

# JAX is the default Keras backend (fastest on GPU); a user's own KERAS_BACKEND wins.
os.environ.setdefault("KERAS_BACKEND", "jax")

from devise.assets import data_home  # noqa: E402
from devise.errors import DeviseError  # noqa: E402
from devise.runtime import enable_compilation_cache  # noqa: E402

# Before anything compiles: a new process reuses compiled programs from the data home (the backbone's
# forward would otherwise compile again in every `devise predict`). A user's own JAX cache wins.
enable_compilation_cache()

from devise import emoji  # noqa: E402,F401  (built-in datasets register themselves, as timm's models do)

__version__ = "0.1.0"

# name -> module that defines it. A function named like its module (train.train, predict.predict,
# search.search, classify.classify) is exported under another name: importing the submodule would
# otherwise replace the package attribute with the module.
_ALIASES = {"classify_images": "classify", "train_model": "train", "predict_images": "predict",
            "search_index": "search"}
_API = {
    # the model object (open_clip's create_model + encode_image/encode_text; keras-hub's presets)
    "load": "model", "DeviseModel": "model", "list_presets": "presets", "PRESETS": "presets",
    # backbones and features
    "load_backbone": "backbones", "Backbone": "backbones", "list_backbones": "backbones", "classify_images": "classify",
    "extract_features": "features", "FeatureSet": "features", "build_image_store": "features",
    "load_image": "images", "load_images": "images",
    # datasets
    "ImageDataset": "datasets", "load_dataset": "datasets", "zero_shot_split": "datasets",
    "validation_split": "datasets", "ZeroShotSplit": "datasets", "ValidationSplit": "datasets",
    "prepare_assets": "datasets", "register_dataset": "datasets", "list_datasets": "datasets",
    # phase 1: label vectors
    "load_vectors": "vectors", "embed_labels": "vectors", "WordVectors": "vectors",
    "LabelEmbedding": "vectors", "SentenceEncoder": "vectors", "train_skipgram": "skipgram",
    "build_corpus": "skipgram", "list_vectors": "vectors",
    # phases 2-3
    "train_model": "train", "train_dataset": "train", "load_model_folder": "model",
    "HingeRankLoss": "losses", "CosineLoss": "losses", "linear_head": "heads", "mlp_head": "heads",
    "softmax_head": "heads", "conse_embed": "conse", "random_label_vectors": "model",
    "build_head": "heads", "finetune_run": "finetune",
    # WordNet and metrics
    "load_wordnet": "wordnet", "WordNet": "wordnet", "hop_distances": "wordnet",
    "zero_shot_label_sets": "wordnet", "top_k_indices": "metrics", "flat_hit_at_k": "metrics",
    "hierarchical_precision_at_k": "metrics", "hcorrect_set_sizes": "metrics",
    "per_class_top1": "metrics", "generalized_zero_shot": "metrics", "choose_calibration": "metrics",
    "expand_to_synsets": "metrics", "evaluate_run": "evaluate", "run_benchmark": "benchmark",
    # prediction, search, serving, scale
    "predict_images": "predict", "load_vocabulary": "vocabulary", "Vocabulary": "vocabulary",
    "score_labels": "ranking", "rank_labels": "ranking", "format_predictions": "predict",
    "build_index": "search", "load_index": "search", "search_index": "search", "create_app": "serve",
    "top_k_labels": "ranking", "use_devices": "runtime",
}

__all__ = ["DeviseError", "data_home", "__version__", *_API]


def __getattr__(name):
    if name in _API:
        value = getattr(importlib.import_module(f"devise.{_API[name]}"), _ALIASES.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'devise' has no attribute {name!r}")
