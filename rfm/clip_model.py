"""CLIP ViT in OpenAI's layout, in plain torch.

``state_dict()`` has exactly the keys of an OpenAI checkpoint (``ViT-B-16.pt`` and the like), so such a
checkpoint loads with ``strict=True`` and every dimension is read from its tensor shapes. Attention is
written out (``self_attention``) rather than delegated to ``nn.MultiheadAttention`` because CLIP-ES and
WeCLIP need its per-head maps and intermediates; the model's own forward goes through the same function.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HEAD_WIDTH = 64  # OpenAI CLIPs use one head per 64 channels
# Entries of an OpenAI state dict that describe the model rather than hold weights.
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


# ---------------------------------------------------------------- attention


@dataclass
class SelfAttention:
    """Intermediates of one multi-head self-attention; leading dims (…) as in the input."""

    q: torch.Tensor  # (…, H, L, d) unscaled queries
    k: torch.Tensor  # (…, H, L, d)
    v: torch.Tensor  # (…, H, L, d)
    probs: torch.Tensor  # (…, H, L, L) post-softmax attention per head
    o: torch.Tensor  # (…, H, L, d) attention output per head, before out_proj
    out: torch.Tensor  # (…, L, D) after out_proj


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(…, L, H·d) → (…, H, L, d)."""
    return t.unflatten(-1, (heads, -1)).transpose(-2, -3)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(…, H, L, d) → (…, L, H·d), the inverse of ``split_heads``."""
    return t.transpose(-2, -3).flatten(-2)


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """P = softmax(Q Kᵀ / √d + M); q, k (…, L, d), additive mask M (L, L) or None → (…, L, L)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # scaling Q is cheaper than scaling the L×L scores
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1)


def self_attention(attn: Attention, z: torch.Tensor, mask: torch.Tensor | None = None) -> SelfAttention:
    """[Q K V] = z W_inᵀ + b_in; O_h = P_h V_h; out = [O_1 … O_H] W_outᵀ + b_out. z (…, L, D)."""
    q, k, v = (split_heads(t, attn.num_heads)
               for t in F.linear(z, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1))
    probs = attention_probs(q, k, mask)
    o = probs @ v
    return SelfAttention(q, k, v, probs, o, attn.out_proj(merge_heads(o)))


def causal_mask(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(L, L) additive mask, −inf above the diagonal: text token i attends to tokens ≤ i only."""
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1)


class QuickGELU(nn.Module):
    """x · σ(1.702 x), the GELU approximation OpenAI's CLIPs were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def derivative(x: torch.Tensor) -> torch.Tensor:
        """d/dx [x · σ(1.702 x)] = σ(1.702 x) · (1 + 1.702 x (1 − σ(1.702 x))), for GradCAM's hand-made backward."""
        sig = torch.sigmoid(1.702 * x)
        return sig * (1 + 1.702 * x * (1 - sig))


class Attention(nn.Module):
    """Packed-projection multi-head self-attention with OpenAI's parameter names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> SelfAttention:
        return self_attention(self, z, mask)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1 x), then + mlp(ln_2 ·) with a QuickGELU MLP of width 4D."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)))

    def attend(self, x: torch.Tensor, normed: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, SelfAttention]:
        """x (…, L, D) → (block output, attention intermediates).

        ``normed`` is ``ln_1(x)`` when the caller already has it (GradCAM differentiates with respect to it).
        """
        att = self.attn(self.ln_1(x) if normed is None else normed, mask)
        x = x + att.out
        return x + self.mlp(self.ln_2(x)), att

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(x, mask=mask)[0]


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


# ---------------------------------------------------------------- towers


@dataclass(frozen=True)
class ClipConfig:
    width: int = 768
    layers: int = 12
    patch_size: int = 16
    grid: int = 14  # pretrained patch grid side: image_size / patch_size
    embed_dim: int = 512
    text_width: int = 512
    text_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408

    def __post_init__(self):
        if self.width % HEAD_WIDTH or self.text_width % HEAD_WIDTH:
            raise ValueError(f"widths must be multiples of {HEAD_WIDTH} (one head per {HEAD_WIDTH} channels), "
                             f"got {self.width} and {self.text_width}")

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "ClipConfig":
        """Dimensions from an OpenAI-format state dict's tensor shapes; KeyError names a missing tensor."""
        conv = sd["visual.conv1.weight"]  # (D, 3, p, p)
        patches = sd["visual.positional_embedding"].shape[0] - 1
        grid = math.isqrt(patches)
        if grid * grid != patches:
            raise ValueError(f"visual.positional_embedding holds {patches} patches, not a square grid")
        return cls(width=conv.shape[0], layers=_count_blocks(sd, "visual.transformer."), patch_size=conv.shape[-1],
                   grid=grid, embed_dim=sd["text_projection"].shape[1], text_width=sd["ln_final.weight"].shape[0],
                   text_layers=_count_blocks(sd, "transformer."), context_length=sd["positional_embedding"].shape[0],
                   vocab_size=sd["token_embedding.weight"].shape[0])


def _count_blocks(sd: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"resblocks\.(\d+)\.")
    return len({m.group(1) for key in sd if (m := pattern.match(key))})


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        self.positional_embedding = nn.Parameter(torch.empty(1 + cfg.grid * cfg.grid, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, w // HEAD_WIDTH)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.empty(w, cfg.embed_dim))

    def embed(self, image: torch.Tensor, positional_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """x_0 = ln_pre([CLS; patches W_conv] + pos); image (B, 3, H, W) → (B, 1 + hw, D).

        ``positional_embedding`` (1 + hw, D) replaces the pretrained one for another grid.
        """
        pos = self.positional_embedding if positional_embedding is None else positional_embedding
        x = self.conv1(image.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (B, hw, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """CLS pooling: ln_post(x_N[CLS]) · proj; image (B, 3, H, W) at the pretrained grid → (B, E)."""
        x = self.transformer(self.embed(image))
        return self.ln_post(x[:, 0]) @ self.proj


class CLIPModel(nn.Module):
    """Image tower ``visual`` and the text tower's parts, named as in OpenAI's checkpoints."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.config = cfg
        tw = cfg.text_width
        self.visual = VisionTransformer(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, tw)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, tw))
        self.transformer = Transformer(tw, cfg.text_layers, tw // HEAD_WIDTH)
        self.ln_final = nn.LayerNorm(tw)
        self.text_projection = nn.Parameter(torch.empty(tw, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised, at the pretrained grid → (B, E), not L2-normalised."""
        return self.visual(image)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """EOT pooling: ln_final(x_N) at argmax(tokens) (the EOT id is the largest), · text_projection.

        tokens (B, T) int, T ≤ context_length → (B, E), not L2-normalised.
        """
        t = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:t]
        x = self.ln_final(self.transformer(x, causal_mask(t, x.device, x.dtype)))
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(image), self.encode_text(tokens)


# ---------------------------------------------------------------- construction


def build_clip_model(state_dict: dict[str, torch.Tensor]) -> CLIPModel:
    """A ``CLIPModel`` in eval mode from an OpenAI-format ViT state dict of any size (strict load).

    The model is float32 whatever the checkpoint's dtype: loading copies into float32 parameters.
    """
    sd = {k: v for k, v in state_dict.items() if k not in NON_WEIGHT_KEYS}
    if "visual.proj" not in sd:
        raise ValueError("not a CLIP ViT checkpoint: it has no 'visual.proj' (ResNet CLIPs are not supported)")
    try:
        model = CLIPModel(ClipConfig.from_state_dict(sd))
        model.load_state_dict(sd, strict=True)
    except KeyError as err:
        raise ValueError(f"not an OpenAI-format CLIP state dict: it has no {err}") from None
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        raise ValueError(f"not an OpenAI-format CLIP state dict: {err}") from None
    return model.eval()


def random_clip_model(cfg: ClipConfig, seed: int = 0) -> CLIPModel:
    """A ``CLIPModel`` with OpenAI-style normal initialisation, for tests and the demo.

    Residual-branch outputs get std D^-½ (2N)^-½ so the residual stream stays O(1) through N blocks;
    attention inputs get D^-½, which keeps QKᵀ/√d of order one (attention neither uniform nor one-hot).
    """
    model = CLIPModel(cfg)
    gen = torch.Generator().manual_seed(seed)

    def normal_(t: torch.Tensor, std: float) -> None:
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=gen) * std)

    def init_tower(transformer: Transformer, width: int) -> None:
        out_std = width ** -0.5 * (2 * len(transformer.resblocks)) ** -0.5
        for block in transformer.resblocks:
            normal_(block.attn.in_proj_weight, width ** -0.5)
            normal_(block.attn.out_proj.weight, out_std)
            normal_(block.mlp.c_fc.weight, (2 * width) ** -0.5)
            normal_(block.mlp.c_proj.weight, out_std)
            for bias in (block.attn.in_proj_bias, block.attn.out_proj.bias, block.mlp.c_fc.bias, block.mlp.c_proj.bias):
                nn.init.zeros_(bias)

    v, w = model.visual, cfg.width
    normal_(v.conv1.weight, (3 * cfg.patch_size ** 2) ** -0.5)
    normal_(v.class_embedding, w ** -0.5)
    normal_(v.positional_embedding, w ** -0.5)
    normal_(v.proj, w ** -0.5)
    init_tower(v.transformer, w)
    normal_(model.token_embedding.weight, 0.02)
    normal_(model.positional_embedding, 0.01)
    normal_(model.text_projection, cfg.text_width ** -0.5)
    init_tower(model.transformer, cfg.text_width)
    nn.init.constant_(model.logit_scale, math.log(1 / 0.07))
    return model.eval()
