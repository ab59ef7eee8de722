"""Defaults written once: the backbone, the label space and the benchmark dataset that every command and
function uses unless told otherwise. (Run folders record their own; these only fill what a caller leaves out.)"""

BACKBONE = "efficientnet_lite0"
# The native MiniLM sentence encoder (label text: vectors.sentence_label_text). GloVe 6B 50-d, the
# paper's kind of label space, stays one flag away: --vectors glove-6b-50d.
VECTORS = "minilm"
# The dataset `devise benchmark` runs on unless told otherwise (a name of datasets.list_datasets()).
BENCHMARK = "emoji"
