"""Where the project keeps weights: user-supplied checkpoints, and the built-in synthetic-scene model."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_DIR = ROOT / "checkpoints"
ASSETS_DIR = ROOT / "assets"
# The small CLIP trained on rfm.synthetic scenes and its WeCLIP decoder (assets/synthetic/README.md).
SYNTHETIC_DIR = ASSETS_DIR / "synthetic"
SYNTHETIC_CLIP = SYNTHETIC_DIR / "clip.pt"
SYNTHETIC_DECODER = SYNTHETIC_DIR / "decoder.safetensors"
REMAKE_HINT = "remake it with scripts/make_builtin_model.sh (assets/synthetic/README.md)"
