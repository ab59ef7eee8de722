"""Defaults written once: the backbone and the label space that every command and function uses
unless told otherwise. (Run folders record their own; these only fill what a caller leaves out.)"""

BACKBONE = "efficientnet_lite0"
VECTORS = "glove-6b-50d"
