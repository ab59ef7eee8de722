"""Check of the hp@k code against the paper's Table 5: mean |hCorrectSet| for the 1000 ImageNet-1K labels.

The paper reports 6.5 / 12.5 / 22.5 / 41.7 at k = 2 / 5 / 10 / 20 on ImageNet's own is-a hierarchy.
Ours is computed on WordNet 3.0's noun graph (undirected hypernym/hyponym edges, instance edges included;
they do not change the numbers for the 1K labels, shown for both), and for comparison on the 1K labels'
ancestor closure alone (ILSVRC-2012's 1,860-synset hierarchy). Last line: RESULT {...} (full WordNet).
Usage: python benchmarks/hcorrect_sizes.py
"""
import json
import time

from devise.assets import imagenet1k_classes
from devise.evaluation.metrics import hcorrect_set_sizes
from devise.labels.wordnet import WordNet, load_wordnet

KS = (2, 5, 10, 20)


def ancestor_closure(wordnet: WordNet, wnids: list[str]) -> WordNet:
    """The labels plus all their WordNet ancestors (for ImageNet-1K: the 1,860 synsets of ILSVRC-2012's
    devkit hierarchy), with only the hypernym edges among them."""
    keep, stack = set(), list(wnids)
    while stack:
        w = stack.pop()
        if w not in keep:
            keep.add(w)
            stack += wordnet.hypernyms(w)
    return WordNet({w: wordnet.lemmas(w) for w in keep},
                   {w: [p for p in wordnet.hypernyms(w) if p in keep] for w in keep})


def main() -> None:
    start = time.perf_counter()
    wordnet = load_wordnet()
    wnids = [c["wnid"] for c in imagenet1k_classes()]
    sizes = hcorrect_set_sizes(wnids, KS, wordnet)
    no_instances = hcorrect_set_sizes(wnids, KS, wordnet, instances=False)
    closure = ancestor_closure(wordnet, wnids)
    ilsvrc = hcorrect_set_sizes(wnids, KS, closure)
    seconds = time.perf_counter() - start
    print("k   paper (ImageNet is-a)  WordNet 3.0  same, no instance edges  "
          f"1K + ancestors only ({len(closure)} synsets)")
    paper = {2: 6.5, 5: 12.5, 10: 22.5, 20: 41.7}
    for k in KS:
        print(f"{k:<3} {paper[k]:>15.1f} {sizes[k]:>14.2f} {no_instances[k]:>18.2f} {ilsvrc[k]:>24.2f}")
    print(f"({len(wnids)} labels, {seconds:.1f} s)")
    print("RESULT " + json.dumps({f"k{k}": round(sizes[k], 2) for k in KS}))


if __name__ == "__main__":
    main()
