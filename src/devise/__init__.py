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

from devise.data import emoji  # noqa: E402,F401  (built-in datasets register themselves, as timm's models do)

__version__ = "0.1.0"

# name -> module that defines it. A function named like its module (train.train, predict.predict,
# search.search, classify.classify) is exported under another name: importing the submodule would
# otherwise replace the package attribute with the module.
_ALIASES = {"classify_images": "classify", "train_model": "train", "predict_images": "predict",
            "search_index": "search"}
_API = {
    # the model object (open_clip's create_model + encode_image/encode_text; keras-hub's presets)
    "load": "models.model", "DeviseModel": "models.model", "list_presets": "models.presets",
    "PRESETS": "models.presets",
    # backbones and features
    "load_backbone": "models.backbones", "Backbone": "models.backbones", "list_backbones": "models.backbones",
    "classify_images": "models.classify",
    "extract_features": "data.features", "FeatureSet": "data.features", "build_image_store": "data.features",
    "load_image": "data.images", "load_images": "data.images",
    # datasets
    "ImageDataset": "data.datasets", "load_dataset": "data.datasets", "zero_shot_split": "data.datasets",
    "validation_split": "data.datasets", "ZeroShotSplit": "data.datasets", "ValidationSplit": "data.datasets",
    "prepare_assets": "data.datasets", "register_dataset": "data.datasets", "list_datasets": "data.datasets",
    # phase 1: label vectors
    "load_vectors": "labels.vectors", "embed_labels": "labels.vectors", "WordVectors": "labels.vectors",
    "LabelEmbedding": "labels.vectors", "SentenceEncoder": "labels.vectors", "train_skipgram": "labels.skipgram",
    "build_corpus": "labels.skipgram", "list_vectors": "labels.vectors",
    # phases 2-3
    "train_model": "training.train", "train_dataset": "training.train", "load_model_folder": "models.model",
    "HingeRankLoss": "training.losses", "CosineLoss": "training.losses", "linear_head": "models.heads",
    "mlp_head": "models.heads",
    "softmax_head": "models.heads", "conse_embed": "models.conse", "random_label_vectors": "models.model",
    "build_head": "models.heads", "finetune_run": "training.finetune",
    # WordNet and metrics
    "load_wordnet": "labels.wordnet", "WordNet": "labels.wordnet", "hop_distances": "labels.wordnet",
    "zero_shot_label_sets": "labels.wordnet", "top_k_indices": "evaluation.metrics",
    "flat_hit_at_k": "evaluation.metrics",
    "hierarchical_precision_at_k": "evaluation.metrics", "hcorrect_set_sizes": "evaluation.metrics",
    "per_class_top1": "evaluation.metrics", "generalized_zero_shot": "evaluation.metrics",
    "choose_calibration": "evaluation.metrics",
    "expand_to_synsets": "evaluation.metrics", "evaluate_run": "evaluation.evaluate",
    "run_benchmark": "evaluation.benchmark",
    # prediction, search, serving, scale
    "predict_images": "serving.predict", "load_vocabulary": "labels.vocabulary", "Vocabulary": "labels.vocabulary",
    "score_labels": "evaluation.ranking", "rank_labels": "evaluation.ranking", "format_predictions": "serving.predict",
    "build_index": "serving.search", "load_index": "serving.search", "search_index": "serving.search",
    "create_app": "serving.serve",
    "top_k_labels": "evaluation.ranking", "use_devices": "runtime",
}

__all__ = ["DeviseError", "data_home", "__version__", *_API]


def __getattr__(name):
    if name in _API:
        value = getattr(importlib.import_module(f"devise.{_API[name]}"), _ALIASES.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'devise' has no attribute {name!r}")
