"""The model object and its parts: backbones, heads, presets, ConSE, the text encoder, ONNX export."""
