"""The real CLI with piped output: no colour codes, warnings on one line without a source excerpt, and
errors that never echo raw binary from a user's file (an escaped, truncated excerpt instead)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from devise.cli import MAX_MESSAGE, printable

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


def devise_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "devise.cli", *map(str, args)], capture_output=True,
                          timeout=timeout, env={**os.environ, "KERAS_BACKEND": "jax"})


def text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def test_printable_escapes_and_truncates():
    assert printable("a\x00b\x1b[31mc\nd") == "a\\x00b\\x1b[31mc d"
    assert len(printable("x" * 5000)) == MAX_MESSAGE and printable("x" * 5000).endswith("...")


@pytest.mark.parametrize("content", [os.urandom(4000), b"cat\ndog\x00\x01\xff\xfe\x1b[31mred\n",
                                     b"cat\n\x1b[31mred\x07\x08\n" + b"\x01" * 500 + b"\n"])
def test_binary_label_file_is_quoted_escaped(tmp_path, content):
    labels = tmp_path / "labels.txt"
    labels.write_bytes(content)
    result = devise_cli("vectors", "info", "--labels", labels)
    assert result.returncode == 2
    err = text(result.stderr)
    assert err.count("\n") == 1 and err.startswith("devise: error: ") and "labels.txt:" in err
    assert not CONTROL.search(err) and len(err) < 300 and "\\x" in err  # the escaped excerpt


def test_binary_vectors_file_error_is_clean(tmp_path):
    vectors = tmp_path / "vectors.txt"
    vectors.write_bytes(b"cat " + b" ".join([b"0.1"] * 50) + b"\n\x1b[31mdog\x00 " + os.urandom(3000) + b"\n")
    result = devise_cli("vectors", "info", vectors)
    assert result.returncode == 2
    err = text(result.stderr)
    assert err.count("\n") == 1 and not CONTROL.search(err) and len(err) <= MAX_MESSAGE + 20


def test_error_naming_a_control_character_path_is_escaped(tmp_path, foolbox_photos):
    tree = tmp_path / "tree"
    (tree / "cat").mkdir(parents=True)
    shutil.copy(foolbox_photos[0], tree / "cat" / "a.jpg")
    (tree / "bad\x1b[31mred\x07").mkdir()  # a class folder with no images and a hostile name
    result = devise_cli("train", tree, "--out", tmp_path / "run")
    assert result.returncode == 2
    err = text(result.stderr)
    assert err.count("\n") == 1 and "\\x1b[31mred\\x07" in err and not CONTROL.search(err)


def test_piped_predict_warns_on_one_line_without_colour(tmp_path, foolbox_photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(foolbox_photos[0], folder / "a.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = devise_cli("predict", folder, "--vocab", "imagenet1k", "--top", "2")
    assert result.returncode == 0, text(result.stderr)[-2000:]
    out, err = text(result.stdout), text(result.stderr)
    assert "\x1b[" not in out + err
    warning_lines = [line for line in err.splitlines() if "broken.jpg" in line]
    assert len(warning_lines) == 1 and warning_lines[0].startswith("devise: warning: ")
    assert "warnings.warn" not in err and "Warning:" not in err  # no source excerpt, no category banner
    assert "a.jpg" in out
