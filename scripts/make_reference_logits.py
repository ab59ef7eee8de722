"""Dev-only: compute the reference PyTorch EfficientNet-Lite logits that tests/test_backbones.py checks against.

How tests/data/foolbox_reference.npz (Lite0) and foolbox_reference_lite2.npz (Lite2) were made (by hand,
with the project venv's python; name the backbones to redo, default both):

    .venv/bin/python scripts/make_reference_logits.py [efficientnet_lite0] [efficientnet_lite2]

1. The reference implementation is `efficientnet-lite-pytorch==0.1.0` + torch: used from the project venv
   when both import there (`./setup.sh --dev` brings torch with the MiniLM extra; then
   `.venv/bin/pip install --no-deps efficientnet-lite-pytorch==0.1.0`, never a default dependency), else
   from a separate virtualenv /tmp/torchref made here (`pip install torch==2.13.0
   efficientnet-lite-pytorch==0.1.0 numpy`; torch's CPU wheel installs offline here).
2. With the project venv it reads the 20 real ImageNet photos in foolbox's data folder
   (devise.assets.foolbox_data_dir(), files imagenet_XX_<label>.jpg, label = ImageNet-1K class index) with
   devise.data.images.load_image(path, S), S = the backbone's resolution (224 for Lite0: short side 256,
   bicubic, centre crop 224; 260 for Lite2: short side 297): the SAME uint8 arrays our Keras model gets.
3. With torch: EfficientNet.from_name('efficientnet-lite0' / 'efficientnet-lite2'), load_state_dict of the
   packaged checkpoint (devise.assets.efficientnet_lite0_checkpoint() / efficientnet_lite2_checkpoint()),
   eval(), input (uint8/255 - ImageNet mean) / ImageNet std in NCHW float32, logits in float32.
4. It writes the fixture: files (20 names), labels (int64 (20,)), logits (float32 (20, 1000)), and prints
   the reference top-1 / top-5 counts.
5. For tests/test_torch_checkpoint.py the Lite0 run also saves, with real torch, one small state dict in both of
   torch's formats: tests/data/torch_small_zip.pt (torch.save default, zip) and torch_small_legacy.pt
   (_use_new_zipfile_serialization=False), plus the expected arrays in torch_small_expected.npz. The state
   dict mixes dtypes (float32, float16, int64 scalar), a transposed (non-contiguous) tensor and two
   tensors sharing one storage at different offsets.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from devise.assets import efficientnet_lite0_checkpoint, efficientnet_lite2_checkpoint, foolbox_data_dir
from devise.data.images import load_image

VENV = Path("/tmp/torchref")
DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
# backbone -> (torch model name, resolution, checkpoint locator, fixture)
VARIANTS = {
    "efficientnet_lite0": ("efficientnet-lite0", 224, efficientnet_lite0_checkpoint, DATA / "foolbox_reference.npz"),
    "efficientnet_lite2": ("efficientnet-lite2", 260, efficientnet_lite2_checkpoint, DATA / "foolbox_reference_lite2.npz"),
}

TORCH_CODE = r"""
import sys
import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet

inputs_path, checkpoint, out_path, data_dir, model_name = sys.argv[1:6]
images = np.load(inputs_path)["images"]
model = EfficientNet.from_name(model_name)
model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False))
model.eval()
mean = np.array([0.485, 0.456, 0.406], np.float32)
std = np.array([0.229, 0.224, 0.225], np.float32)
x = (images.astype(np.float32) / 255.0 - mean) / std
with torch.no_grad():
    logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().astype(np.float32)
np.save(out_path, logits)
print("torch", torch.__version__)
if model_name != "efficientnet-lite0":
    sys.exit(0)

# Small state dicts in both on-disk formats for the checkpoint reader's tests.
full = model.state_dict()
shared = torch.arange(100, dtype=torch.float32)
small = {
    "stem.weight": full["_conv_stem.weight"].clone(),
    "stem.weight_t": full["_conv_stem.weight"].clone().permute(1, 0, 3, 2),
    "bn.weight_half": full["_bn0.weight"].clone().half(),
    "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    "shared.all": shared,
    "shared.slice": shared[10:20],
}
torch.save(small, f"{data_dir}/torch_small_zip.pt")
torch.save(small, f"{data_dir}/torch_small_legacy.pt", _use_new_zipfile_serialization=False)
np.savez(f"{data_dir}/torch_small_expected.npz", **{k: v.numpy() for k, v in small.items()})
"""


def ensure_venv() -> Path:
    if all(importlib.util.find_spec(m) for m in ("torch", "efficientnet_lite_pytorch")):
        return Path(sys.executable)
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0",
                        "efficientnet-lite-pytorch==0.1.0", "numpy"], check=True)
    return python


def foolbox_imagenet_files() -> list[Path]:
    return sorted(foolbox_data_dir().glob("imagenet_*.jpg"))


def make_fixture(python: Path, backbone: str) -> None:
    model_name, size, checkpoint, output = VARIANTS[backbone]
    files = foolbox_imagenet_files()
    labels = np.array([int(f.stem.split("_")[-1]) for f in files], np.int64)
    images = np.stack([load_image(f, size) for f in files])
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        inputs, logits_path = os.path.join(tmp, "inputs.npz"), os.path.join(tmp, "logits.npy")
        np.savez(inputs, images=images)
        subprocess.run([str(python), "-c", TORCH_CODE, inputs, str(checkpoint()), logits_path,
                        str(output.parent), model_name], check=True)
        logits = np.load(logits_path)
    tmp_out = output.with_suffix(".tmp.npz")
    np.savez(tmp_out, files=np.array([f.name for f in files]), labels=labels, logits=logits)
    os.replace(tmp_out, output)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    print(f"wrote {output}: top-1 {int((top5[:, 0] == labels).sum())}/{len(files)}, "
          f"top-5 {int((top5 == labels[:, None]).any(1).sum())}/{len(files)}")


def main(argv: list[str]) -> None:
    unknown = [a for a in argv if a not in VARIANTS]
    if unknown:
        sys.exit(f"unknown backbone {unknown[0]}: choose from {', '.join(VARIANTS)}")
    python = ensure_venv()
    for backbone in argv or list(VARIANTS):
        make_fixture(python, backbone)


if __name__ == "__main__":
    main(sys.argv[1:])
