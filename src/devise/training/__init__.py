"""Training heads (and fine-tuning the backbone) on cached features."""
