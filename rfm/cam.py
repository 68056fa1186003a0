"""CLIP-ES initial CAM: softmax-GradCAM on the last block's ``ln_1`` output, all classes at once.

CLIP-ES runs one forward/backward of the last block per class. The forward does not depend on the
class, and GradCAM only needs the gradient averaged over the patch tokens, so this module runs the
block forward once and back-propagates all K class targets together through a hand-derived backward
in which the attention part reduces to per-token sums (see ``_patch_mean_input_grad``). The test
suite checks the result against the per-class autograd procedure of CLIP-ES.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbone import FrozenClip, pooled_image_features
from .clip_model import self_attention
from .refine import minmax_normalize


@dataclass
class LastBlock:
    """Forward intermediates of the last block for one image (L = 1 + hw tokens)."""

    z: torch.Tensor  # (L, D) ln_1 output: the GradCAM target layer
    q: torch.Tensor  # (H, L, d) unscaled queries
    k: torch.Tensor  # (H, L, d)
    v: torch.Tensor  # (H, L, d)
    probs_attn: torch.Tensor  # (H, L, L) post-softmax attention per head
    o: torch.Tensor  # (H, L, d) attention output per head, before out_proj
    y: torch.Tensor  # (L, D) after the attention residual
    u1: torch.Tensor  # (L, 4D) MLP pre-activation
    y2: torch.Tensor  # (L, D) block output
    feature: torch.Tensor  # (E,) pooled image feature, before L2 normalisation


@dataclass
class InitialCam:
    cams: torch.Tensor  # (K, h, w) in [0, 1]
    attn_last: torch.Tensor  # (hw, hw) head-averaged attention of the last block, CLS dropped
    probs: torch.Tensor  # (K + B,) softmax over [present classes; background words]


def forward_last_block(clip: FrozenClip, x: torch.Tensor) -> LastBlock:
    """x (L, D): output of block N − 1 → the last block's intermediates and the CLIP-ES pooled feature."""
    block = clip.model.visual.transformer.resblocks[-1]
    z = block.ln_1(x)
    att = self_attention(block.attn, z)
    y = x + att.out
    u1 = block.mlp.c_fc(block.ln_2(y))
    y2 = y + block.mlp.c_proj(block.mlp.gelu(u1))
    feature = pooled_image_features(clip, y2[None])[0]
    return LastBlock(z, att.q, att.k, att.v, att.probs, att.o, y, u1, y2, feature)


def class_probabilities(feature: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """p = softmax(s · cos(f, t_j)) over the text rows [present classes; background words] (CLIP-ES's target)."""
    return torch.softmax(logit_scale * F.normalize(feature, dim=-1) @ text.T, dim=-1)


def _layer_norm_input_grad(ln: torch.nn.LayerNorm, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Back-propagate grad_out (…, L, D) through LayerNorm at input x (L, D)."""
    mu = x.mean(-1, keepdim=True)
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
    x_hat = (x - mu) / sigma
    g = grad_out * ln.weight if ln.weight is not None else grad_out
    return (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True)) / sigma


def _grad_through_ln_post(ln: torch.nn.LayerNorm, x: torch.Tensor, grad_token: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradient at the block output (dy2) when every patch token receives the same cotangent
    through ln_post (mean pooling), the CLS token none, and the factors it is made of.

    x (L, D): block output; grad_token (K, D). With g = γ ⊙ grad_token, x̂ the normalised tokens and
    m_i = [i is a patch] / σ_i:  dy2_i = (g − mean g − s_i x̂_i) m_i,  s_i = g·x̂_i / D.
    Returns dy2 (K, L, D), g − mean g (K, D), s (K, L, 1), x̂ (L, D), m (L, 1): the factored form lets
    the MLP backward multiply class-independent terms once instead of K times.
    """
    d = x.shape[-1]
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)  # (L, 1)
    x_hat = (x - x.mean(-1, keepdim=True)) / sigma
    g = grad_token * ln.weight  # (K, D)
    g_centred = g - g.mean(-1, keepdim=True)
    s = (g @ x_hat.T / d)[:, :, None]  # (K, L, 1)
    m = 1 / sigma
    m[0] = 0  # the CLS token is not pooled
    dy2 = (g_centred[:, None, :] - s * x_hat) * m
    return dy2, g_centred, s, x_hat, m


def _mlp_input_grad(mlp: torch.nn.Module, u1: torch.Tensor, g_centred: torch.Tensor, s: torch.Tensor,
                    x_hat: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The gradient at the MLP's input, dy2 · W_proj ⊙ act′(u1) · W_fc, from the factors of dy2.

    dy2_i · W_proj = (a − s_i b_i) m_i with a = (g − mean g) W_proj (per class) and b_i = x̂_i W_proj
    (per token), so with c_i = act′(u1_i) m_i the result is (a ⊙ c_i) W_fc − s_i (b_i ⊙ c_i) W_fc:
    the second product is class-independent. u1 (L, 4D) → (K, L, D).
    """
    w_proj, w_fc = mlp.c_proj.weight, mlp.c_fc.weight  # (D, 4D), (4D, D)
    c = mlp.gelu.derivative(u1) * m  # (L, 4D)
    shared = ((x_hat @ w_proj) * c) @ w_fc  # (L, D)
    return ((g_centred @ w_proj)[:, None, :] * c) @ w_fc - s * shared


def _patch_mean_input_grad(clip: FrozenClip, fw: LastBlock, grad_feature: torch.Tensor) -> torch.Tensor:
    """GradCAM channel weights: the gradient w.r.t. z, averaged over the patch tokens.

    grad_feature (K, E): one cotangent per class at the pooled feature → (K, D).
    Only Σ_{i≥1} ∂/∂z_i is needed, so with P the attention, dO the gradient at its output, r_i = dO_i·O_i:
      Σ_{i≥1} dV_i = Σ_j (1 − P_j0) dO_j
      Σ_{i≥1} dQ_i = Σ_j c_j K_j / √d,  c_j = V_j·(P[1:]ᵀ dO[1:])_j − (P[1:]ᵀ r[1:])_j
      Σ_{i≥1} dK_i = −Σ_j dS_j0 Q_j / √d,  dS_j0 = P_j0 (dO_j·V_0 − r_j)   (rows of dS sum to 0)
    """
    visual = clip.model.visual
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    heads, width = attn.num_heads, fw.z.shape[-1]
    d = width // heads
    n = fw.z.shape[0] - 1
    num = grad_feature.shape[0]

    grad_mean_token = grad_feature @ visual.proj.T  # (K, D)
    dy2, g_centred, s, x_hat, m = _grad_through_ln_post(visual.ln_post, fw.y2, grad_mean_token / n)
    dy = dy2 + _layer_norm_input_grad(block.ln_2, fw.y, _mlp_input_grad(block.mlp, fw.u1, g_centred, s, x_hat, m))
    d_o = (dy @ attn.out_proj.weight).reshape(num, -1, heads, d).transpose(1, 2)  # (K, H, L, d)

    p = fw.probs_attn  # (H, L, L)
    r = (d_o * fw.o).sum(-1)  # (K, H, L)
    sum_dv = torch.einsum("hj,khjd->khd", 1 - p[:, :, 0], d_o)
    pt_do = torch.einsum("hij,khid->khjd", p[:, 1:], d_o[:, :, 1:])
    col = (fw.v * pt_do).sum(-1) - torch.einsum("hij,khi->khj", p[:, 1:], r[:, :, 1:])
    sum_dq = torch.einsum("khj,hjd->khd", col, fw.k) / math.sqrt(d)
    ds0 = p[:, :, 0] * ((d_o * fw.v[:, :1]).sum(-1) - r)
    sum_dk = -torch.einsum("khj,hjd->khd", ds0, fw.q) / math.sqrt(d)

    w_q, w_k, w_v = attn.in_proj_weight.split(width, dim=0)
    flat = lambda t: t.reshape(num, width)  # noqa: E731 — heads back to channels, matching the split
    return (flat(sum_dq) @ w_q + flat(sum_dk) @ w_k + flat(sum_dv) @ w_v) / n


def gradcam_maps(z: torch.Tensor, weights: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """CAM_c = minmax(ReLU(Σ_d w_c[d] · z_d)) over the patch tokens; z (L, D), weights (K, D) → (K, h, w).

    pytorch-grad-cam, which CLIP-ES uses, applies ReLU + min-max per map and then again when it
    aggregates target layers; with one layer the second pass is kept for exactness.
    """
    cam = torch.relu(weights @ z[1:].T).reshape(-1, *grid)
    return minmax_normalize(torch.relu(minmax_normalize(cam)))


@torch.no_grad()
def initial_cam(clip: FrozenClip, x: torch.Tensor, grid: tuple[int, int], fg_text: torch.Tensor,
                bg_text: torch.Tensor) -> InitialCam:
    """x (L, D): block N − 1 output; fg_text (K, E) present classes in label order; bg_text (B, E)."""
    fw = forward_last_block(clip, x)
    text = torch.cat([fg_text, bg_text]).to(fw.feature.dtype)
    scale = float(clip.model.logit_scale.exp())
    p = class_probabilities(fw.feature, text, scale)
    num = fg_text.shape[0]
    # ∂p_c/∂logits = p_c (e_c − p); logits = s·f̂·tᵀ; f̂ = f/|f|
    d_logits = p[:num, None] * (torch.eye(num, p.shape[0], dtype=p.dtype, device=p.device) - p[None])
    f_norm = fw.feature.norm()
    f_hat = fw.feature / f_norm
    d_fhat = scale * d_logits @ text
    d_feature = (d_fhat - (d_fhat @ f_hat)[:, None] * f_hat) / f_norm
    weights = _patch_mean_input_grad(clip, fw, d_feature)
    return InitialCam(cams=gradcam_maps(fw.z, weights, grid), attn_last=fw.probs_attn.mean(0)[1:, 1:], probs=p)
