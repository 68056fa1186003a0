"""Initial CAM: the batched analytic GradCAM against CLIP-ES's per-class autograd procedure."""
import pytest
import torch
import torch.nn.functional as F

from rfm.backbone import attention_block, forward_blocks, random_clip
from rfm.cam import forward_last_block, initial_cam


def clip_es_gradcam(clip, x, grid, fg, bg):
    """CLIP-ES, one class at a time: forward block N on the cached block N−1 tokens, softmax over
    [present; background], backward of the class probability to block N's ln_1 output, channel-mean
    weights over the patch tokens, ReLU, min-max (twice, as pytorch-grad-cam does)."""
    visual = clip.model.visual
    block = visual.transformer.resblocks[-1]
    text = torch.cat([fg, bg])
    cams, attn = [], None
    for c in range(fg.shape[0]):
        with torch.enable_grad():
            z = block.ln_1(x[None]).detach().requires_grad_(True)
            y, attn = attention_block(block, x[None], normed=z)
            feat = visual.ln_post(y)[:, 1:].mean(1) @ visual.proj
            probs = (clip.model.logit_scale.exp() * F.normalize(feat, dim=-1) @ text.T).softmax(-1)
            (grad,) = torch.autograd.grad(probs[0, c], z)
        weights = grad[0, 1:].mean(0)
        cam = torch.relu(z[0, 1:].detach() @ weights).reshape(grid)
        for _ in range(2):
            cam = torch.relu(cam)
            cam = (cam - cam.min()) / ((cam - cam.min()).max() + 1e-7)
        cams.append(cam)
    return torch.stack(cams), attn[0, 1:, 1:].detach(), probs[0].detach()


@pytest.fixture(scope="module")
def clip64():
    # float64 so that the comparison tests the algebra, not float32 rounding
    clip = random_clip(device="cpu", seed=5, width=128, layers=3, embed_dim=64, text_width=64, text_layers=1)
    clip.model.double()
    return clip


@pytest.mark.parametrize("num_classes,size", [(1, (64, 96)), (3, (80, 48)), (5, (48, 48))])
def test_batched_gradcam_equals_per_class_autograd(clip64, num_classes, size):
    torch.manual_seed(num_classes)
    image = torch.randn(1, 3, *size, dtype=torch.float64)
    blocks = forward_blocks(clip64, image)
    x = blocks.tokens[-1][0]
    fg = F.normalize(torch.randn(num_classes, 64, dtype=torch.float64), dim=-1)
    bg = F.normalize(torch.randn(7, 64, dtype=torch.float64), dim=-1)
    ours = initial_cam(clip64, x, blocks.grid, fg, bg)
    ref_cams, ref_attn, ref_probs = clip_es_gradcam(clip64, x, blocks.grid, fg, bg)
    assert ours.cams.shape == (num_classes, *blocks.grid)
    assert torch.allclose(ours.cams, ref_cams, atol=1e-9), (ours.cams - ref_cams).abs().max()
    assert torch.allclose(ours.attn_last, ref_attn, atol=1e-12)
    assert torch.allclose(ours.probs, ref_probs, atol=1e-12)
    assert ours.cams.min() >= 0 and ours.cams.max() <= 1


def test_float32_model_agrees_to_clip_es_tolerance(small_clip):
    torch.manual_seed(7)
    blocks = forward_blocks(small_clip, torch.randn(1, 3, 64, 80))
    fg = F.normalize(torch.randn(2, 64), dim=-1)
    bg = F.normalize(torch.randn(25, 64), dim=-1)
    ours = initial_cam(small_clip, blocks.tokens[-1][0], blocks.grid, fg, bg)
    ref, _, _ = clip_es_gradcam(small_clip, blocks.tokens[-1][0], blocks.grid, fg, bg)
    assert (ours.cams - ref).abs().max() < 1e-3


def test_last_block_forward_matches_the_model_block(clip64):
    torch.manual_seed(8)
    x = torch.randn(1 + 12, 128, dtype=torch.float64)
    fw = forward_last_block(clip64, x)
    block = clip64.model.visual.transformer.resblocks[-1]
    with torch.no_grad():
        expected = block(x[None])[0]
    assert torch.allclose(fw.y2, expected, atol=1e-10)
    assert torch.allclose(fw.probs_attn.sum(-1), torch.ones_like(fw.probs_attn.sum(-1)))


def test_classes_compete_through_the_softmax(clip64):
    """The target is a softmax probability: adding a class changes the others' CAMs (unlike raw logits)."""
    torch.manual_seed(9)
    blocks = forward_blocks(clip64, torch.randn(1, 3, 64, 64, dtype=torch.float64))
    x = blocks.tokens[-1][0]
    fg = F.normalize(torch.randn(2, 64, dtype=torch.float64), dim=-1)
    bg = F.normalize(torch.randn(5, 64, dtype=torch.float64), dim=-1)
    alone = initial_cam(clip64, x, blocks.grid, fg[:1], bg).cams[0]
    together = initial_cam(clip64, x, blocks.grid, fg, bg).cams[0]
    assert not torch.allclose(alone, together, atol=1e-6)
