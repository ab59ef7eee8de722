"""The README's Python example runs as written, in a fresh process."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds one example"
    return blocks[0]


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, foolbox_photos):
    # my_photos/: the folder the example trains on (two classes of real photos)
    for i, photo in enumerate(foolbox_photos[:12]):
        folder = tmp_path / "my_photos" / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, folder / photo.name)
    done = subprocess.run([sys.executable, "-c", python_example()], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "['conse', 'conse_glove', 'conse_lite2']" in done.stdout
    assert (tmp_path / "runs" / "mine" / "settings.json").is_file()
    lines = done.stdout.splitlines()
    assert any("Egyptian cat" in line or "tabby" in line for line in lines), done.stdout[-2000:]  # the ConSE top 3
    assert lines[-1].startswith("[[{'label': '") and lines[-1].count("'label'") == 1  # one label, one image
