"""Without the Ray extra, --ray is one line saying how to install it, before any work (Ray hidden here)."""
import sys

from devise.cli import main


def test_ray_flag_without_ray_is_one_line(tmp_path, foolbox_photos, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when it is not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    out = tmp_path / "x.index"
    assert main(["index", str(foolbox_photos[0]), "--out", str(out), "--ray", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "devise: error: the Ray engine needs Ray: pip install -e '.[ray]'"
    assert not out.exists()
    assert main(["features", "emoji", "--ray", "auto"]) == 2
    assert "pip install -e '.[ray]'" in capsys.readouterr().err
