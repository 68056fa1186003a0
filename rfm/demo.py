"""Demo models: random weights in the real architectures, for exploring the app without CLIP weights."""
from __future__ import annotations

import torch

from .backbone import FrozenClip, pick_device, random_clip
from .decoder import Decoder

DEMO_WARNING = "random weights — heatmaps are meaningless"


def demo_models(device=None, seed: int = 0) -> tuple[FrozenClip, Decoder]:
    """A small random CLIP with ViT-B/16's depth and patch size (12 blocks, so N0 = 7 and the last 8
    static layers are valid) and a random WeCLIP decoder that fits it. Fast on a laptop CPU."""
    device = pick_device(device)
    clip = random_clip(device=device, seed=seed, width=128, layers=12, patch_size=16, image_size=224,
                       embed_dim=64, text_width=64, text_layers=1)
    torch.manual_seed(seed)
    decoder = Decoder(width=clip.width, num_blocks=clip.num_blocks - 1, embed_dim=64, heads=8, layers=1)
    return clip, decoder.to(device).eval()
