"""Random weights in the real architectures: the app's demo mode, and the baseline that shows the
built-in model's scores are learnt."""
from __future__ import annotations

import torch

from .backbone import FrozenClip, pick_device, random_clip
from .decoder import Decoder

DEMO_WARNING = "random weights — heatmaps are meaningless"

# The built-in synthetic-scene CLIP (scripts/train_synthetic_clip.py): OpenAI layout, one head per 64 channels.
SYNTHETIC_ARCH = dict(width=128, layers=12, patch_size=16, image_size=192, embed_dim=128, text_width=128,
                      text_layers=4)
SYNTHETIC_DECODER_DIM = 256


def demo_models(device=None, seed: int = 0) -> tuple[FrozenClip, Decoder]:
    """A small random CLIP with ViT-B/16's depth and patch size (12 blocks, so N0 = 7 and the last 8
    static layers are valid) and a random WeCLIP decoder that fits it. Fast on a laptop CPU."""
    device = pick_device(device)
    clip = random_clip(device=device, seed=seed, width=128, layers=12, patch_size=16, image_size=224,
                       embed_dim=64, text_width=64, text_layers=1)
    torch.manual_seed(seed)
    decoder = Decoder(width=clip.width, num_blocks=clip.num_blocks - 1, embed_dim=64, heads=8, layers=1)
    return clip, decoder.to(device).eval()


def random_builtin_like(device=None, seed: int = 0, num_classes: int = 13) -> tuple[FrozenClip, Decoder]:
    """The built-in model's architecture (CLIP and decoder) with random weights."""
    device = pick_device(device)
    clip = random_clip(device=device, seed=seed, **SYNTHETIC_ARCH)
    torch.manual_seed(seed)
    decoder = Decoder(width=clip.width, num_blocks=clip.num_blocks - 1, embed_dim=SYNTHETIC_DECODER_DIM,
                      num_classes=num_classes)
    return clip, decoder.to(device).eval()
