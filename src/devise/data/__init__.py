"""Images and datasets: the built-in benchmark, decoding and framing, the decode-and-forward pipeline, cached features and shards, the Ray engine."""
