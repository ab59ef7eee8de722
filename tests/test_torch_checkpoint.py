"""Reading torch checkpoints without torch: the packaged EfficientNet-Lite0 (legacy format) and small
state dicts that real torch 2.13 wrote in both formats (see scripts/make_reference_logits.py)."""
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from devise.assets import efficientnet_lite0_checkpoint
from devise.errors import DeviseError
from devise.models.torch_checkpoint import load_state_dict

DATA = Path(__file__).parent / "data"


def test_packaged_lite0_checkpoint_keys_and_shapes():
    state = load_state_dict(efficientnet_lite0_checkpoint())
    assert len(state) == 296
    assert list(state)[0] == "_conv_stem.weight"
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.weight"].dtype == np.float32
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    params = sum(v.size for k, v in state.items() if "running" not in k and "num_batches" not in k)
    assert params == 4_652_008  # EfficientNet-Lite0's published 4.65M
    assert np.isfinite(state["_fc.weight"]).all() and state["_bn1.running_var"].min() > 0
    assert "torch" not in sys.modules


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_small_state_dicts_written_by_torch(fmt):
    expected = np.load(DATA / "torch_small_expected.npz")
    state = load_state_dict(DATA / f"torch_small_{fmt}.pt")
    assert list(state) == list(expected.files)
    for key in expected.files:
        assert state[key].dtype == expected[key].dtype, key
        assert state[key].shape == expected[key].shape, key
        np.testing.assert_array_equal(state[key], expected[key], err_msg=key)
    # A transposed tensor and a slice sharing storage come back as their own (contiguous) values.
    np.testing.assert_array_equal(state["stem.weight_t"], state["stem.weight"].transpose(1, 0, 3, 2))
    np.testing.assert_array_equal(state["shared.slice"], np.arange(10, 20, dtype=np.float32))


def _one_line_error(path) -> str:
    with pytest.raises(DeviseError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_bad_files_give_one_line_errors(tmp_path):
    assert "no such" in _one_line_error(tmp_path / "missing.pth")

    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    _one_line_error(junk)

    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint\n")
    _one_line_error(text)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(efficientnet_lite0_checkpoint().read_bytes()[:200_000])
    assert "truncated" in _one_line_error(truncated)

    empty_zip = tmp_path / "empty.pt"
    with zipfile.ZipFile(empty_zip, "w") as z:
        z.writestr("archive/version", "3")
    assert "data.pkl" in _one_line_error(empty_zip)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_arbitrary_globals_are_refused_not_run(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": _Evil()}, protocol=2))
    assert "unsupported object" in _one_line_error(path)
    assert "code ran" not in capsys.readouterr().out
