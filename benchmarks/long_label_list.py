"""What bounds encoding a long label list with MiniLM? Texts/s, and where the time goes.

Labels are real: every lemma of every WordNet 3.0 noun synset ("tiger cat", "Felis catus"...), unique,
shuffled (seed 0), the first --labels of them. The model is built and every padded shape compiled
first (a warm-up pass over the same texts), then, timed in one process, medians of --repeats:
- tokenize: the Rust tokenizer over all texts (TextEncoder.tokenize);
- encode: TextEncoder.encode, what a vocabulary build runs (tokenize + pad + forward + read back);
- forward: the compiled forward alone over the same padded batches (no Python around it);
and the padding: word pieces run through the model / real word pieces (buckets and power-of-two batches).
The rest of encode (encode - tokenize - forward) is the Python that pads batches and reads results back.
With --batch-sizes, the encode is timed again at other batch sizes (same texts).
Last line: RESULT {"texts_per_s", "tokenize_share", "forward_share", "padding_ratio", ...}.

2026-12-05, 2 CPU cores shared with other jobs (load average ~20), 20,000 lemmas (5.05 word pieces each
with [CLS]/[SEP]): 314 texts/s; the compiled forward is 96% of the time, tokenizing 4%, the Python that
pads and reads back under 1%; padding runs 1.10x the real word pieces; batch 256 was slower (251/s).
So the model's arithmetic bounds it (~120 MFLOP a text, ~38 GFLOP/s: what two cores give), and 200,000
labels take ~11 minutes; only fewer or shorter texts, or a smaller model, would make it much faster.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np

import devise  # noqa: F401  (sets the Keras backend)
from devise import runtime
from devise.models.text_encoder import TextEncoder, bucket_length
from devise.labels.wordnet import load_wordnet


def labels(count: int) -> list[str]:
    wn = load_wordnet()
    names = dict.fromkeys(lemma.replace("_", " ") for i in wn.all_noun_ids() for lemma in wn.lemmas(i))
    names = list(names)
    random.Random(0).shuffle(names)
    return names[:count]


def padded_batches(encoder: TextEncoder, texts: list[str]):
    """The batches encode builds, as (tokens, real word pieces)."""
    ids = encoder.tokenize(texts)
    lengths = np.array([len(x) for x in ids])
    order = np.argsort(-lengths, kind="stable")
    out = []
    for rows in encoder._batches(lengths[order], order):
        length = bucket_length(int(lengths[rows[0]]))
        size = min(encoder.batch_size, 1 << (len(rows) - 1).bit_length())
        tokens = np.zeros((max(size, len(rows)), 3, length), np.int32)
        for j, row in enumerate(rows):
            tokens[j, 0, :lengths[row]] = ids[row]
            tokens[j, 2, :lengths[row]] = 1
        out.append((tokens, int(lengths[rows].sum())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--labels", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[])
    args = parser.parse_args()
    texts = labels(args.labels)
    encoder = TextEncoder()
    encoder.encode(texts, progress=False)  # warm-up: build, trace and compile every shape
    batches = padded_batches(encoder, texts)
    forward = runtime.cached_forward(encoder.model)

    def run_forward():
        pending = [forward(tokens) for tokens, _ in batches]
        for result in pending:
            np.asarray(result)

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    tokenize_s = timed(lambda: encoder.tokenize(texts))
    encode_s = timed(lambda: encoder.encode(texts, progress=False))
    forward_s = timed(run_forward)
    real = sum(n for _, n in batches)
    run = sum(int(np.prod(tokens.shape[::2])) for tokens, _ in batches)
    result = {"labels": len(texts), "texts_per_s": round(len(texts) / encode_s, 1), "encode_s": round(encode_s, 2),
              "tokenize_s": round(tokenize_s, 3), "forward_s": round(forward_s, 2),
              "tokenize_share": round(tokenize_s / encode_s, 3), "forward_share": round(forward_s / encode_s, 3),
              "padding_ratio": round(run / real, 3), "mean_word_pieces": round(real / len(texts), 2),
              "batches": len(batches), "batch_size": encoder.batch_size}
    for size in args.batch_sizes:
        other = TextEncoder(batch_size=size)
        other.encode(texts, progress=False)
        result[f"texts_per_s_batch{size}"] = round(len(texts) / timed(lambda: other.encode(texts, progress=False)), 1)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
