"""The native Keras MiniLM encoder against sentence-transformers (torch) on the same CPU and texts.

Texts are real WordNet 3.0 noun synsets: the first lemma ("tiger cat", what SentenceEncoder embeds for a
synset id today) and "lemma: gloss" (about 20 word pieces). Both sides get the same texts, batch size
and normalisation; the model is built and every shape compiled before timing (a warm-up pass), then
each side is timed 3 times, interleaved, and the medians are compared. The reference side is skipped,
with a note, where sentence-transformers is not installed (`pip install -e '.[reference]'`).

Then all 82,115 noun synsets' first-lemma texts are encoded natively, once, timed (model already
built; compilations of new shapes included). The same for "lemma: gloss" texts with --full-gloss;
otherwise their time is an ESTIMATE from the sample's rate.

Ends with RESULT {"labels_per_s": native first-lemma labels/s, "ratio_vs_sentence_transformers":
native / reference labels/s (null when skipped), "wordnet_all_s": seconds for all 82,115}.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import devise  # noqa: F401  (sets the Keras backend)
from devise.text_encoder import TextEncoder
from devise.wordnet import load_wordnet

REPEATS = 3


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=1024, help="texts per timed run (random synsets)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--full-gloss", action="store_true", help="also encode all 82,115 'lemma: gloss' texts")
    args = parser.parse_args()

    wn = load_wordnet()
    ids = wn.all_noun_ids()
    lemma_texts = [wn.lemmas(i)[0].replace("_", " ") for i in ids]
    gloss_texts = [f"{lemma}: {wn.gloss(i)}" for lemma, i in zip(lemma_texts, ids)]
    picks = random.Random(0).sample(range(len(ids)), args.sample)
    samples = {"lemma": [lemma_texts[i] for i in picks], "lemma: gloss": [gloss_texts[i] for i in picks]}

    import keras  # noqa: F401  (imported before the clock starts: the build time is the model's own)

    start = time.perf_counter()
    native = TextEncoder(batch_size=args.batch_size)
    native.model
    print(f"native model built in {time.perf_counter() - start:.2f} s (weights loaded as the initial values)")
    encode_native = lambda texts: native.encode(texts, progress=False)  # noqa: E731

    encode_ref = None
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        reference = SentenceTransformer(str(native.folder), device="cpu")
        encode_ref = lambda texts: reference.encode(  # noqa: E731
            texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)
        print(f"reference: sentence-transformers on torch {torch.__version__}, {torch.get_num_threads()} threads")
    except ImportError:
        print("reference: sentence-transformers is not installed; native side only "
              "(pip install -e '.[reference]' to compare)")

    rates: dict[str, dict[str, float]] = {}
    for kind, texts in samples.items():
        tokens = sum(map(len, native.tokenize(texts))) / len(texts)
        encode_native(texts)  # warm-up: compiles every shape these texts need
        if encode_ref:
            encode_ref(texts)
        runs: dict[str, list[float]] = {"native": [], "sentence-transformers": []}
        for _ in range(REPEATS):  # interleaved, so both sides see the same machine load
            runs["native"].append(timed(lambda: encode_native(texts)))
            if encode_ref:
                runs["sentence-transformers"].append(timed(lambda: encode_ref(texts)))
        rates[kind] = {side: len(texts) / statistics.median(t) for side, t in runs.items() if t}
        line = ", ".join(f"{side} {rate:7.0f} labels/s" for side, rate in rates[kind].items())
        print(f"{kind!r:>14} texts ({len(texts)}, {tokens:.1f} word pieces on average, batch {args.batch_size}, "
              f"median of {REPEATS}): {line}", flush=True)

    wordnet_all_s = timed(lambda: native.encode(lemma_texts))
    print(f"all {len(lemma_texts)} WordNet noun synsets, first-lemma texts: {wordnet_all_s:.1f} s "
          f"({len(lemma_texts) / wordnet_all_s:.0f} labels/s)")
    if args.full_gloss:
        seconds = timed(lambda: native.encode(gloss_texts))
        print(f"all {len(gloss_texts)} WordNet noun synsets, 'lemma: gloss' texts: {seconds:.1f} s (measured)")
    else:
        estimate = len(gloss_texts) / rates["lemma: gloss"]["native"]
        print(f"all {len(gloss_texts)} WordNet noun synsets, 'lemma: gloss' texts: ~{estimate:.0f} s "
              f"(ESTIMATE from the {args.sample}-text sample's rate; --full-gloss measures it)")

    ref_rate = rates["lemma"].get("sentence-transformers")
    result = {"labels_per_s": round(rates["lemma"]["native"], 1),
              "ratio_vs_sentence_transformers": round(rates["lemma"]["native"] / ref_rate, 2) if ref_rate else None,
              "wordnet_all_s": round(wordnet_all_s, 1)}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
