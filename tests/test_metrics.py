"""Metrics on hand-checked cases (a toy hierarchy built with the real WordNet class) and on real WordNet."""
import numpy as np
import pytest

from devise.assets import imagenet1k_classes
from devise.errors import DeviseError
from devise.evaluation.metrics import (choose_calibration, expand_to_synsets, flat_hit_at_k, generalized_zero_shot,
                            hcorrect_set_sizes, hcorrect_sets, hierarchical_precision_at_k, per_class_top1,
                            term_synset_lists, top_k_indices)
from devise.labels.wordnet import WordNet, load_wordnet

#            root
#          /      \
#        A          B*          (* = in the label set)
#     /  |  \      /  \
#   a1* a2* a3*  b1*  b2*
#    |                 :  (instance edge)
#   a11*               i*
TOY = WordNet(
    synsets={w: [w] for w in ["root", "A", "B", "a1", "a2", "a3", "a11", "b1", "b2", "i"]},
    hypernyms={"A": ["root"], "B": ["root"], "a1": ["A"], "a2": ["A"], "a3": ["A"], "a11": ["a1"],
               "b1": ["B"], "b2": ["B"]},
    instance_hypernyms={"i": ["b2"]},
)
LABELS = ["a1", "a11", "a2", "a3", "B", "b1", "b2", "i", None]  # label 8 has no synset
A1, A11, A2, A3, B, B1, B2, I, NOSYN = range(9)


def test_top_k_breaks_ties_by_lower_index():
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5, 4, 3, 2, np.nan]])
    assert top_k_indices(scores, 2).tolist() == [[1, 2], [0, 1], [0, 1]]
    assert top_k_indices(scores, 4).tolist() == [[1, 2, 4, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert top_k_indices(scores, 9).shape == (3, 5)  # k larger than the label set: every label
    assert top_k_indices(scores, 5)[2].tolist() == [0, 1, 2, 3, 4]  # NaN ranks last


def test_top_k_matches_a_full_stable_sort_on_random_scores_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, size=(300, 250)).astype(np.float32)  # many ties
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :7]
    assert np.array_equal(top_k_indices(scores, 7), expected)


def test_flat_hit_at_k_from_scores_and_from_topk():
    scores = np.array([[0.1, 0.9, 0.5], [0.8, 0.1, 0.3], [0.2, 0.3, 0.1]])
    true = [2, 0, 2]
    assert flat_hit_at_k(scores, true, ks=(1, 2, 5)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 5: 1.0}
    topk = np.array([[1, 2], [0, 2], [1, -1]])
    assert flat_hit_at_k(topk, true, ks=(1, 2)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
    with pytest.raises(DeviseError, match="fewer than k=5"):
        flat_hit_at_k(topk, true, ks=(5,))


def test_hcorrect_set_worked_out_by_hand():
    sets = hcorrect_sets([A1, B1, I, NOSYN], LABELS, ks=(1, 2, 3, 5, 6, 8, 20), wordnet=TOY)
    # true a1: R0 {a1}; R1 +a11 (A is not a label); R2 +a2 a3; R3 +B (via root); R4 +b1 b2; R5 +i
    assert sets[1][A1].tolist() == [A1]
    assert sets[2][A1].tolist() == [A1, A11]
    assert sets[3][A1].tolist() == [A1, A11, A2, A3]  # radius 2 overshoots k=3
    assert sets[5][A1].tolist() == [A1, A11, A2, A3, B]
    assert sets[6][A1].tolist() == [A1, A11, A2, A3, B, B1, B2]
    assert sets[8][A1].tolist() == [A1, A11, A2, A3, B, B1, B2, I]
    # k larger than the label set: the search stops once every label with a synset is reached
    assert sets[20][A1].tolist() == [A1, A11, A2, A3, B, B1, B2, I]
    # true b1: R1 +B; R2 +b2 (sibling; root is not a label); R3 +i
    assert sets[2][B1].tolist() == [B, B1]
    assert sets[3][B1].tolist() == [B, B1, B2]
    assert sets[5][B1].tolist() == [A1, A2, A3, B, B1, B2, I]  # R4 via root -> A -> a1 a2 a3
    # instance edges count as one hop
    assert sets[2][I].tolist() == [B2, I]
    # a label without a synset is its own hCorrectSet
    assert sets[5][NOSYN].tolist() == [NOSYN]


def test_instance_edges_can_be_left_out():
    sets = hcorrect_sets([I], LABELS, ks=(2,), wordnet=TOY, instances=False)
    assert sets[2][I].tolist() == [I]  # isolated without its instance edge: the search ends


def test_hierarchical_precision_by_hand():
    topk = np.array([
        [A1, B, A11, A2, A3],    # true a1: hCorrect(2)={a1,a11}, (5)={a1,a11,a2,a3,B}
        [A2, A3, A1, B, NOSYN],  # true a1
        [B2, I, A1, B1, B],      # true b1: hCorrect(2)={B,b1}, (5)={a1,a2,a3,B,b1,b2,i}
    ])
    true = [A1, A1, B1]
    hp, sizes = hierarchical_precision_at_k(topk, true, LABELS, TOY, ks=(1, 2, 5), return_sizes=True)
    assert hp[1] == pytest.approx((1 + 0 + 0) / 3)
    assert hp[2] == pytest.approx((1 / 2 + 0 / 2 + 0 / 2) / 3)
    assert hp[5] == pytest.approx((5 / 5 + 4 / 5 + 5 / 5) / 3)
    assert sizes == {1: 1.0, 2: 2.0, 5: pytest.approx((5 + 5 + 7) / 3)}
    # predictions padded with -1 never count
    padded = np.where(np.arange(5) < 2, topk, -1)
    assert hierarchical_precision_at_k(padded, true, LABELS, TOY, ks=(5,))[5] == pytest.approx((2 + 2 + 2) / 15)


def test_hierarchical_precision_with_k_larger_than_the_label_set():
    labels = ["a1", "a2", "b1"]
    scores = np.array([[0.9, 0.5, 0.1], [0.1, 0.2, 0.3]])
    hp, sizes = hierarchical_precision_at_k(scores, [0, 2], labels, TOY, ks=(5,), return_sizes=True)
    # every label is predicted and every label is in hCorrectSet: 3 of k=5 places can be right
    assert hp[5] == pytest.approx(3 / 5) and sizes[5] == 3.0


def test_hierarchical_precision_on_real_wordnet_and_imagenet_labels():
    wn = load_wordnet()
    wnids = [c["wnid"] for c in imagenet1k_classes()]
    rng = np.random.default_rng(1)
    true = rng.integers(0, 1000, size=400)
    scores = rng.normal(size=(400, 1000)).astype(np.float32)
    scores[np.arange(200), true[:200]] += 3.0  # half the images right at top 1
    hit = flat_hit_at_k(scores, true, ks=(1,))
    hp = hierarchical_precision_at_k(scores, true, wnids, wn, ks=(1, 2, 5))
    assert hp[1] == pytest.approx(hit[1])  # the paper: hp@1 = hit@1
    assert 0 < hp[5] < hp[2] < hp[1] < 1
    # an oracle ranking labels by hop distance from the true label fills top-k from hCorrectSet: hp@k = 1
    from devise.labels.wordnet import hop_distances
    oracle = np.full((20, 1000), -99.0)
    for row, t in enumerate(true[:20]):
        dist = hop_distances([wnids[t]], 12, wn)
        oracle[row] = [-dist.get(w, 99) for w in wnids]
    assert hierarchical_precision_at_k(oracle, true[:20], wnids, wn, ks=(2, 5, 10)) == {2: 1.0, 5: 1.0, 10: 1.0}
    tabby, tiger_cat = wnids.index("n02123045"), wnids.index("n02123159")
    sets = hcorrect_sets([tabby], wnids, ks=(2,), wordnet=wn)
    assert tiger_cat in sets[2][tabby]  # the sibling, 2 hops away via domestic cat


def test_hcorrect_set_sizes_for_imagenet_1k():
    """The Table-5 check on WordNet 3.0's graph (the paper's 6.5/12.5/22.5/41.7 used ImageNet's hierarchy)."""
    sizes = hcorrect_set_sizes([c["wnid"] for c in imagenet1k_classes()], (2, 5, 10, 20), load_wordnet())
    assert sizes[2] == pytest.approx(4.54, abs=0.01) and sizes[5] == pytest.approx(9.48, abs=0.01)
    assert sizes[10] == pytest.approx(17.99, abs=0.01) and sizes[20] == pytest.approx(33.82, abs=0.01)


def test_per_class_top1_weights_classes_equally():
    pred = [0, 0, 1, 1, 1, 2]
    true = [0, 0, 0, 1, 1, 3]
    assert per_class_top1(pred, true) == pytest.approx((2 / 3 + 1 + 0) / 3)  # overall accuracy would be 4/6


# labels 0, 1 seen; 2, 3 unseen
SEEN = np.array([True, True, False, False])
GZ_SCORES = np.array([
    [0.9, 0.1, 0.5, 0.0],  # seen 0   -> 0 (right); margin best seen - best unseen = 0.4
    [0.2, 0.6, 0.7, 0.0],  # seen 1   -> 2 (wrong); margin -0.1
    [0.8, 0.0, 0.6, 0.1],  # unseen 2 -> 0 (wrong); margin 0.2
    [0.1, 0.0, 0.2, 0.5],  # unseen 3 -> 3 (right); margin -0.4
    [0.3, 0.0, 0.9, 0.0],  # unseen 2 -> 2 (right); margin -0.6
])
GZ_TRUE = np.array([0, 1, 2, 3, 2])
GZ_UNSEEN = np.array([False, False, True, True, True])


def test_generalized_zero_shot_raw_and_calibrated_by_hand():
    raw = generalized_zero_shot(GZ_SCORES, GZ_TRUE, SEEN, GZ_UNSEEN)
    assert raw == {"u": pytest.approx(0.75), "s": pytest.approx(0.5), "H": pytest.approx(0.6)}
    cal = generalized_zero_shot(GZ_SCORES, GZ_TRUE, SEEN, GZ_UNSEEN, gamma=0.25)  # image 2 flips to label 2
    assert cal == {"u": pytest.approx(1.0), "s": pytest.approx(0.5), "H": pytest.approx(2 / 3)}
    too_much = generalized_zero_shot(GZ_SCORES, GZ_TRUE, SEEN, GZ_UNSEEN, gamma=0.5)  # image 0 flips too
    assert too_much["s"] == pytest.approx(0.0) and too_much["H"] == 0.0
    # equivalent to the arg-max over explicitly shifted scores
    shifted = GZ_SCORES - 0.25 * SEEN
    assert shifted.argmax(axis=1).tolist() == [0, 2, 2, 3, 2]
    with pytest.raises(DeviseError, match="both seen and unseen"):
        generalized_zero_shot(GZ_SCORES, GZ_TRUE, SEEN, np.zeros(5, bool))


def test_calibration_is_chosen_on_validation_data():
    # on these images H is best when seen scores are RAISED by 0.1..0.4 (gamma in (-0.4, -0.1)):
    # image 1 becomes right, image 3 stays right: u = (1/2 + 1) / 2, s = 1, H = 6/7
    gamma = choose_calibration(GZ_SCORES, GZ_TRUE, SEEN, GZ_UNSEEN)
    assert -0.4 < gamma < -0.1
    assert generalized_zero_shot(GZ_SCORES, GZ_TRUE, SEEN, GZ_UNSEEN, gamma)["H"] == pytest.approx(6 / 7)
    # an explicit grid is honoured; among equal H the gamma closest to 0 wins
    assert choose_calibration(GZ_SCORES, GZ_TRUE, SEEN, GZ_UNSEEN, gammas=[0.3, 0.25, 0.0]) == 0.25
    # a validation set biased towards seen labels calls for a positive gamma
    val = GZ_SCORES.copy()
    val[:, :2] += 0.5
    assert choose_calibration(val, GZ_TRUE, SEEN, GZ_UNSEEN) == pytest.approx(gamma + 0.5, abs=0.15)


def test_calibration_grid_scales_to_many_images():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(3000, 50))
    seen = np.arange(50) < 30
    true = rng.integers(0, 50, size=3000)
    scores[np.arange(3000), true] += 1.5
    scores[:, seen] += 1.0  # a seen-label bias that calibration must remove
    unseen = ~seen[true]
    gamma = choose_calibration(scores, true, seen, unseen)
    assert 0.3 < gamma < 2.0
    raw = generalized_zero_shot(scores, true, seen, unseen)["H"]
    assert generalized_zero_shot(scores, true, seen, unseen, gamma)["H"] > raw + 0.1


def test_expand_to_synsets_appendix_a2():
    term_to_synsets = [[2, 0], [0], [], [1, 3]]
    ranked = np.array([[1, 0, 2, 3], [3, 0, 1, 2]])
    assert expand_to_synsets(ranked, term_to_synsets, 2).tolist() == [[0, 2], [1, 3]]
    assert expand_to_synsets(ranked, term_to_synsets, 5).tolist() == [[0, 2, 1, 3, -1], [1, 3, 2, 0, -1]]
    # only the 4k nearest terms are expanded
    assert expand_to_synsets(np.array([[2, 2, 2, 2, 3]]), term_to_synsets, 1).tolist() == [[-1]]


def test_expand_to_synsets_with_real_wordnet_terms():
    wn = load_wordnet()
    synsets = ["n02121620", "n02123045", "n02084071", "n10153414"]  # cat, tabby, dog, guy ("cat" sense 2)
    terms = ["cat", "tabby", "dog", "true cat"]
    lists = term_synset_lists(terms, synsets, wn)
    assert lists == [[0, 3], [1], [2], [0]]
    top = expand_to_synsets(np.array([[0, 1, 2, 3], [3, 2, 1, 0]]), lists, 2)
    assert top.tolist() == [[0, 3], [0, 2]]
