"""Open-vocabulary prediction for image files: images -> a model's unit vectors -> nearest labels.

    predict(["chelsea.jpg"])                         # the default model, the WordNet vocabulary
    predict("photos/", model="runs/devise", vocab="labels.txt", top_k=3, hubness="csls")

The model is a `devise.models.model.DeviseModel` (a preset such as "conse", a run folder, or one already
loaded); the vocabulary a `devise.labels.vocabulary.Vocabulary` ("wordnet", "imagenet1k", a label FILE);
scoring, hubness correction and ranking are devise.evaluation.ranking's. A hubness `reference` can be a search
index folder (devise.serving.search): its images are then the reference set.
"""
from __future__ import annotations

import os

import numpy as np

from devise.evaluation.confidence import answer, rank_with_probabilities, resolve_threshold
from devise.errors import DeviseError
from devise.data.images import expand_image_paths
from devise.models.model import load
from devise.models.presets import DEFAULT_MODEL
from devise.serving.search import load_index
from devise.labels.vocabulary import Vocabulary, load_vocabulary


def reference_embeddings(reference) -> np.ndarray | None:
    """A hubness reference set: image embeddings as given, or those of a search index folder."""
    if isinstance(reference, (str, os.PathLike)):
        return load_index(reference).embeddings
    return None if reference is None else np.asarray(reference, np.float32)


def _vocabulary(vocab, model, drop_missing: bool = False) -> Vocabulary:
    return vocab if isinstance(vocab, Vocabulary) else load_vocabulary(vocab, model.vectors_spec, drop_missing)


def with_answers(images: list, ranked: list[list[dict]], threshold: float) -> list[dict]:
    """[{"image", "answer", "min_confidence", "predictions"}]: the answer is the top label, or "unknown"
    when its probability is below the threshold."""
    return [{"image": image, "answer": answer(preds, threshold), "min_confidence": threshold, "predictions": preds}
            for image, preds in zip(images, ranked)]


def predict_arrays(images: np.ndarray, model=DEFAULT_MODEL, vocab="wordnet", top_k: int = 5,
                   hubness: str | None = None, reference=None, vectors: str | None = None,
                   background=None) -> list[list[dict]]:
    """uint8 (N, S, S, 3) images -> per image its top_k predictions [{"label", "synset", "score",
    "probability"}].

    model: a preset name, a run folder or a DeviseModel; vocab: a name, a label FILE or a Vocabulary."""
    model = load(model, vectors)
    model.check_open_vocabulary()
    vocabulary = _vocabulary(vocab, model)
    return rank_with_probabilities(model, model.encode_images(images), vocabulary, top_k, hubness,
                                   reference_embeddings(reference), background)


def predict(paths, model=DEFAULT_MODEL, vocab="wordnet", top_k: int = 5, hubness: str | None = None,
            reference=None, progress: bool = False, drop_missing: bool = False,
            vectors: str | None = None, min_confidence: float | None = None) -> list[dict]:
    """Open-vocabulary labels for image files (folders expand to their images), embedded in batches.

    model: a preset name (devise.list_presets(kind="model")), a run folder or a DeviseModel; vectors: a
    preset's label space (default: the preset's); a run folder brings its own. hubness: "csls" or
    "center", against `reference` (image embeddings or a search index folder; default: these images).
    min_confidence: below this probability the answer is "unknown" (default: the model's threshold,
    chosen on validation data, for vocabularies of up to 1,000 labels; 0 always answers).

    Returns [{"image": PATH, "answer": LABEL or "unknown", "min_confidence": P, "predictions": [{"label",
    "synset", "score", "probability"}, ...]}] in rank order; score is the cosine (or the hubness-corrected
    score), probability the label's calibrated probability among the vocabulary (devise.evaluation.confidence).
    Unreadable files are reported in one warning and left out.
    """
    paths = expand_image_paths([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    model = load(model, vectors)
    model.check_open_vocabulary()
    resolve_threshold(model, min_confidence)  # a bad value fails before any work
    vocabulary = _vocabulary(vocab, model, drop_missing)
    threshold = resolve_threshold(model, min_confidence, len(vocabulary.matrix))
    embeddings, valid = model.encode_paths(paths, progress=progress)
    if not valid.any():
        raise DeviseError("none of the images could be read: " + ", ".join(paths[:5]))
    kept = [p for p, ok in zip(paths, valid) if ok]
    ranked = rank_with_probabilities(model, embeddings[valid], vocabulary, top_k, hubness,
                                     reference_embeddings(reference))
    return with_answers(kept, ranked, threshold)


def format_predictions(results: list[dict], score_format: str = "{:+.3f}") -> str:
    """Readable text of predict's (or classify's) results: the image path, its answer (a label or
    "unknown"), then one line per prediction (rank, score, probability, label, synset). score_format: "{:+.3f}" for cosines, "{:6.1%}" for probabilities."""
    lines = []
    for result in results:
        lines.append(result["image"])
        if "answer" in result:
            lines.append(f"  answer: {result['answer']}" + (
                f"  (no label reaches {result['min_confidence']:.1%})" if result["answer"] == "unknown" else ""))
        for rank, pred in enumerate(result["predictions"], 1):
            synset = f"  ({pred['synset']})" if pred["synset"] else ""
            probability = f"  {pred['probability']:6.1%}" if "probability" in pred else ""
            lines.append(f"  {rank}. {score_format.format(pred['score'])}{probability}  {pred['label']}{synset}")
    return "\n".join(lines)
