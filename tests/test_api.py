"""The public API re-exported from `devise` resolves to the real objects, also after submodule imports."""
import importlib

import devise


def test_every_export_resolves():
    import devise.serving.predict  # noqa: F401  (submodule imports must not shadow the exported names)
    import devise.training.train  # noqa: F401

    for name, module in devise._API.items():
        target = getattr(importlib.import_module(f"devise.{module}"), devise._ALIASES.get(name, name))
        assert getattr(devise, name) is target, name
    assert devise.train_model is devise.training.train.train
    assert callable(devise.predict_images)
