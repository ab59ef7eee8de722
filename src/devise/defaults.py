"""Defaults written once: the backbone, the label space and the benchmark dataset that every command and
function uses unless told otherwise. (Run folders record their own; these only fill what a caller leaves out.)"""

# The ImageNet classifier of `devise classify` and the ConSE model presets (predict, index, search, serve).
BACKBONE = "efficientnet_lite0"
# The features heads are trained on (`devise train`, `features`, `benchmark`): Lite0 and Lite2 side by side.
# Chosen on validation data only (the GZSL benchmark run again inside its own seen classes,
# benchmarks/gzsl_nested.py): calibrated H of the 5-head DeViSE 21.3 -> 23.9, of its mean with ConSE
# 23.4 -> 24.7, against Lite0 alone (Lite2 alone lost: 20.4). Cost: the forward runs at Lite2's speed,
# about a third of Lite0's on a CPU, and heads on 2560-d features train about 1.5x as long.
TRAIN_BACKBONE = "efficientnet_lite0_lite2"
# The native MiniLM sentence encoder (label text: vectors.sentence_label_text). GloVe 6B 50-d, the
# paper's kind of label space, stays one flag away: --vectors glove-6b-50d.
VECTORS = "minilm"
# The dataset `devise benchmark` runs on unless told otherwise (a name of datasets.list_datasets()).
BENCHMARK = "emoji"
