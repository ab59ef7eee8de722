"""devise: DeViSE, the Deep Visual-Semantic Embedding model (Frome et al., NeurIPS 2013), on Keras 3.

The public Python API is re-exported here; the `devise` command is a thin layer over it (devise/cli.py).
"""
import os

# JAX is the default Keras backend (fastest on GPU); a user's own KERAS_BACKEND wins.
os.environ.setdefault("KERAS_BACKEND", "jax")

from devise.errors import DeviseError  # noqa: E402
from devise.assets import data_home  # noqa: E402

__version__ = "0.1.0"

__all__ = ["DeviseError", "data_home", "__version__"]
