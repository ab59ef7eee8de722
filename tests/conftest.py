import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")


@pytest.fixture(scope="session")
def foolbox_photos() -> list[Path]:
    """The 20 real ImageNet photos that foolbox ships (label index in the file name)."""
    from devise.assets import foolbox_data_dir

    return sorted(foolbox_data_dir().glob("imagenet_*.jpg"))


@pytest.fixture
def photo_folder(tmp_path, foolbox_photos) -> Path:
    """A class-per-folder tree of real photos: three classes by ImageNet label."""
    root = tmp_path / "photos"
    for i, src in enumerate(foolbox_photos[:12]):
        cls = ["cat", "water buffalo", "n02123045"][i % 3]
        (root / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / cls / src.name)
    return root


@pytest.fixture
def fail_after():
    """fail_after(seconds): a context manager that fails the test instead of hanging (opening a FIFO blocks
    forever), with SIGALRM."""
    @contextmanager
    def limit(seconds: int = 120):
        def fail(*_):
            raise AssertionError(f"still running after {seconds} s (a FIFO was opened?)")

        previous = signal.signal(signal.SIGALRM, fail)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    return limit
