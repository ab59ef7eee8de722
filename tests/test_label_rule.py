"""The label rule's fallbacks with real GloVe vectors and real WordNet: no label is dropped or random."""
import numpy as np

from devise.assets import imagenet1k_classes
from devise.labels.vectors import embed_labels, load_vectors
from devise.labels.wordnet import load_wordnet


def test_synset_without_lemma_vectors_takes_its_nearest_hypernym():
    wordnet, glove = load_wordnet(), load_vectors("glove-6b-50d")
    # n02104029 is kuvasz: GloVe 6B has no 'kuvasz'; its hypernym watchdog has a vector.
    emb = embed_labels(["n02104029"], glove, wordnet=wordnet)
    assert emb.source[0].startswith("hypernym n02103841 'watchdog' (1 up)")
    np.testing.assert_allclose(emb.matrix[0], glove.vector("watchdog"), atol=1e-6)
    assert "1 by hypernym" in emb.coverage_report()


def test_every_imagenet_class_gets_a_vector_with_glove():
    wnids = [c["wnid"] for c in imagenet1k_classes()]
    emb = embed_labels(wnids, load_vectors("glove-6b-50d"), wordnet=load_wordnet())
    assert emb.labels == wnids and not emb.dropped  # 15 were dropped before the hypernym fallback
    assert np.allclose(np.linalg.norm(emb.matrix, axis=1), 1.0, atol=1e-5)


def test_a_class_has_three_texts_with_or_without_a_wordnet_given():
    """Dataset classes are embedded from three texts (vectors.sentence_label_texts); reading WordNet
    itself when none is passed, as the one-text rule does."""
    from devise.labels.vectors import sentence_label_texts

    wordnet = load_wordnet()
    texts = sentence_label_texts("tabby", wordnet, "n02123045")
    assert texts == ["tabby", "tabby: a cat with a grey or tawny coat mottled with black",
                     "tabby, a kind of domestic cat"]
    assert sentence_label_texts("tabby", None, "n02123045") == texts
    assert sentence_label_texts("n02123045") == texts
    assert sentence_label_texts("foo bar") == ["foo bar"]
