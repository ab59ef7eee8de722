"""The native Keras MiniLM encoder against sentence-transformers (torch) on the same CPU and texts.

Texts are real WordNet 3.0 noun synsets: the first lemma ("tiger cat", what SentenceEncoder embeds for a
synset id today) and "lemma: gloss" (about 20 word pieces). Both sides get the same texts, batch size
and normalisation; the model is built and every shape compiled before timing (a warm-up pass), then
each side is timed 3 times, interleaved, and the medians are compared. The reference runs with 1 torch
thread and with torch's default, and its faster setting counts. The reference side is skipped,
with a note, where sentence-transformers is not installed (`pip install -e '.[reference]'`).

Then all 82,115 noun synsets' first-lemma texts are encoded natively, once, timed (model already
built; compilations of new shapes included). The same for "lemma: gloss" texts with --full-gloss;
otherwise their time is an ESTIMATE from the sample's rate.

Ends with RESULT {"labels_per_s": native first-lemma labels/s, "ratio_vs_sentence_transformers":
native / best reference labels/s (null when skipped), "wordnet_all_s": seconds for all 82,115}.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import devise  # noqa: F401  (sets the Keras backend)
from devise.models.text_encoder import TextEncoder
from devise.labels.wordnet import load_wordnet

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

    sides = {"native": encode_native}
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        reference = SentenceTransformer(str(native.folder), device="cpu")

        def reference_side(threads: int):
            def encode(texts):
                torch.set_num_threads(threads)
                return reference.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                                        convert_to_numpy=True)
            return encode

        # torch's default (one thread per core) collapses when the cores are shared with other work (we
        # measured 45-75 labels/s against 350-480 with one thread): the reference gets its best setting.
        for threads in sorted({1, torch.get_num_threads()}):
            sides[f"sentence-transformers ({threads} torch threads)"] = reference_side(threads)
        print(f"reference: sentence-transformers on torch {torch.__version__}, CPU, timed at "
              f"{' and '.join(str(n) for n in sorted({1, torch.get_num_threads()}))} threads; the faster counts")
    except ImportError:
        print("reference: sentence-transformers is not installed; native side only "
              "(pip install -e '.[reference]' to compare)")

    rates: dict[str, dict[str, float]] = {}
    for kind, texts in samples.items():
        tokens = sum(map(len, native.tokenize(texts))) / len(texts)
        for encode in sides.values():  # warm-up: compiles every shape these texts need
            encode(texts)
        runs: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(REPEATS):  # interleaved, so every side sees the same machine load
            for side, encode in sides.items():
                runs[side].append(timed(lambda: encode(texts)))
        rates[kind] = {side: len(texts) / statistics.median(t) for side, t in runs.items()}
        print(f"{kind!r} texts ({len(texts)}, {tokens:.1f} word pieces on average, batch {args.batch_size}, "
              f"median of {REPEATS}):", flush=True)
        for side, rate in rates[kind].items():
            print(f"  {side:<40} {rate:7.0f} labels/s")

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

    ref_rate = max((rate for side, rate in rates["lemma"].items() if side != "native"), default=None)
    result = {"labels_per_s": round(rates["lemma"]["native"], 1),
              "ratio_vs_sentence_transformers": round(rates["lemma"]["native"] / ref_rate, 2) if ref_rate else None,
              "wordnet_all_s": round(wordnet_all_s, 1)}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
