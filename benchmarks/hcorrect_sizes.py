"""Check of the hp@k code against the paper's Table 5: mean |hCorrectSet| for the 1000 ImageNet-1K labels.

The paper reports 6.5 / 12.5 / 22.5 / 41.7 at k = 2 / 5 / 10 / 20 on ImageNet's own is-a hierarchy.
Ours is computed on WordNet 3.0's noun graph (undirected hypernym/hyponym edges, instance edges included;
they do not change the numbers for the 1K labels, shown for both). Last line: RESULT {...}.
Usage: python benchmarks/hcorrect_sizes.py
"""
import json
import time

from devise.assets import imagenet1k_classes
from devise.metrics import hcorrect_set_sizes
from devise.wordnet import load_wordnet

KS = (2, 5, 10, 20)


def main() -> None:
    start = time.perf_counter()
    wordnet = load_wordnet()
    wnids = [c["wnid"] for c in imagenet1k_classes()]
    sizes = hcorrect_set_sizes(wnids, KS, wordnet)
    no_instances = hcorrect_set_sizes(wnids, KS, wordnet, instances=False)
    seconds = time.perf_counter() - start
    print("k    paper (ImageNet is-a)   ours (WordNet 3.0)   ours without instance edges")
    paper = {2: 6.5, 5: 12.5, 10: 22.5, 20: 41.7}
    for k in KS:
        print(f"{k:<4} {paper[k]:>8.1f} {sizes[k]:>22.2f} {no_instances[k]:>22.2f}")
    print(f"({len(wnids)} labels, {seconds:.1f} s)")
    print("RESULT " + json.dumps({f"k{k}": round(sizes[k], 2) for k in KS}))


if __name__ == "__main__":
    main()
