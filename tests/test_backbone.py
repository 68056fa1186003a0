"""Backbone: loading, positional-embedding resizing, every-block forward and its attention."""
import math
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rfm import backbone
from rfm.backbone import (ClipWeightsNotFound, FrozenClip, build_clip, drop_cls, embed, forward_blocks, load_clip,
                          network_size, random_clip_state_dict, read_openai_state_dict, resize_positional_embedding)
from rfm.clip_model import causal_mask, self_attention
from rfm.paths import SYNTHETIC_CLIP
from conftest import SMALL_CLIP


def test_native_resolution_matches_encode_image(small_clip):
    """At 224×224 with CLS pooling, our block-by-block forward is the model's own encode_image."""
    torch.manual_seed(1)
    image = torch.randn(2, 3, 224, 224)
    blocks = forward_blocks(small_clip, image)
    last = small_clip.model.visual.transformer.resblocks[-1]
    with torch.no_grad():
        x = last(blocks.tokens[-1])
        ours = small_clip.model.visual.ln_post(x[:, 0]) @ small_clip.model.visual.proj
        theirs = small_clip.model.encode_image(image)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def _attention_by_hand(block, x):
    """Head-averaged softmax(QKᵀ/√d) from the packed in_proj weights, written out."""
    d_model = x.shape[-1]
    heads = block.attn.num_heads
    d = d_model // heads
    z = F.layer_norm(x, (d_model,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    q = (z @ w[:d_model].T + b[:d_model]).reshape(x.shape[0], -1, heads, d).transpose(1, 2)
    k = (z @ w[d_model:2 * d_model].T + b[d_model:2 * d_model]).reshape(x.shape[0], -1, heads, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(1)


def test_attention_is_head_averaged_softmax_with_cls_dropped_not_renormalised(small_clip):
    torch.manual_seed(2)
    image = torch.randn(1, 3, 48, 80)  # 3×5 grid: non-square, not the pretrained 14×14
    blocks = forward_blocks(small_clip, image)
    n = 3 * 5
    assert blocks.grid == (3, 5)
    assert blocks.attn.shape == (SMALL_CLIP["layers"] - 1, n, n)
    x = embed(small_clip, image)
    for layer, block in enumerate(small_clip.model.visual.transformer.resblocks[:-1]):
        full = _attention_by_hand(block, x)  # (1, 1 + n, 1 + n), rows sum to 1 including CLS
        assert torch.allclose(full.sum(-1), torch.ones(1, 1 + n), atol=1e-5)
        assert torch.allclose(blocks.attn[layer], full[0, 1:, 1:], atol=1e-6)
        assert (blocks.attn[layer].sum(-1) < 1).all()  # the CLS mass is gone and rows are not rescaled
        x = blocks.tokens[layer]


def _open_clip_model(sd: dict, cfg: dict):
    """open_clip's own CLIP (QuickGELU) with the same OpenAI-format weights."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(cfg["embed_dim"],
                 CLIPVisionCfg(layers=cfg["layers"], width=cfg["width"], patch_size=cfg["patch_size"],
                               image_size=cfg["image_size"]),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=cfg["text_width"],
                             heads=cfg["text_width"] // 64, layers=cfg["text_layers"]),
                 quick_gelu=True)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def test_model_matches_open_clip_loaded_with_the_same_state_dict():
    """The per-version check: our CLIP and the installed open_clip's compute the same image and text features."""
    cfg = dict(SMALL_CLIP, layers=2, text_layers=2)
    sd = random_clip_state_dict(seed=4, **cfg)
    ours, theirs = build_clip(sd), _open_clip_model(sd, cfg)
    torch.manual_seed(4)
    image = torch.randn(2, 3, 224, 224)
    tokens = FrozenClip(ours).tokenizer(["a photo of a cat.", "two dogs on a red sofa near the window"])
    with torch.no_grad():
        for a, b in ((ours.encode_image(image), theirs.encode_image(image)),
                     (ours.encode_text(tokens), theirs.encode_text(tokens))):
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_equals_torch_multihead_attention(small_clip, causal):
    attn = small_clip.model.visual.transformer.resblocks[0].attn
    width = attn.out_proj.in_features
    mha = torch.nn.MultiheadAttention(width, attn.num_heads, batch_first=True)
    mha.load_state_dict(attn.state_dict())
    torch.manual_seed(5)
    z = torch.randn(2, 9, width)
    mask = causal_mask(9) if causal else None
    ours = self_attention(attn, z, mask)
    with torch.no_grad():
        out, probs = mha(z, z, z, need_weights=True, average_attn_weights=False, attn_mask=mask)
    assert ours.probs.shape == probs.shape == (2, attn.num_heads, 9, 9)
    assert torch.allclose(ours.probs, probs, atol=1e-6)
    assert torch.allclose(ours.out, out, atol=1e-6)
    assert torch.allclose(ours.o, ours.probs @ ours.v)
    if causal:
        assert (ours.probs.triu(1) == 0).all()


def test_random_init_gives_attention_neither_uniform_nor_one_hot(small_clip):
    torch.manual_seed(6)
    attn = forward_blocks(small_clip, torch.randn(1, 3, 64, 64)).attn  # (N − 1, 16, 16), CLS dropped
    peak = float(attn.max(-1).values.mean())
    assert 2 / 17 < peak < 0.9  # uniform rows over the 1 + 16 tokens would peak at 1/17


def test_builtin_clip_file_loads_with_openai_keys():
    sd = read_openai_state_dict(SYNTHETIC_CLIP)
    model = build_clip(sd)
    loaded = model.state_dict()
    assert loaded.keys() == sd.keys()
    assert {"visual.proj", "visual.transformer.resblocks.0.attn.in_proj_weight",
            "visual.transformer.resblocks.0.mlp.c_fc.bias", "transformer.resblocks.0.attn.out_proj.weight",
            "token_embedding.weight", "text_projection", "logit_scale"} <= loaded.keys()
    for key, value in sd.items():
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], value.float()), key


def test_inconsistent_state_dict_is_a_clear_error():
    sd = random_clip_state_dict(seed=0, **SMALL_CLIP)
    missing = {k: v for k, v in sd.items() if k != "visual.transformer.resblocks.1.ln_2.bias"}
    with pytest.raises(ValueError, match="(?s)not an OpenAI-format CLIP state dict.*resblocks.1.ln_2.bias"):
        build_clip(missing)
    with pytest.raises(ValueError, match="(?s)not an OpenAI-format CLIP state dict.*visual.proj"):
        build_clip({**sd, "visual.proj": torch.zeros(128, 32)})  # embed dim differs from the text tower's
    with pytest.raises(ValueError, match="multiples of 64"):
        build_clip({**sd, "visual.conv1.weight": torch.zeros(100, 3, 16, 16)})


def test_frozen_clip_rejects_other_models():
    with pytest.raises(TypeError, match="CLIPModel"):
        FrozenClip(torch.nn.Linear(2, 2))


def _bilinear_reference(grid_in: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """align_corners=False bilinear resize of (g, g, D), from the half-pixel sampling formula."""
    g = grid_in.shape[0]
    out = np.zeros((out_h, out_w, grid_in.shape[2]))
    for i in range(out_h):
        for j in range(out_w):
            y = min(max((i + 0.5) * g / out_h - 0.5, 0), g - 1)
            x = min(max((j + 0.5) * g / out_w - 0.5, 0), g - 1)
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            y1, x1 = min(y0 + 1, g - 1), min(x0 + 1, g - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = ((1 - dy) * (1 - dx) * grid_in[y0, x0] + (1 - dy) * dx * grid_in[y0, x1]
                         + dy * (1 - dx) * grid_in[y1, x0] + dy * dx * grid_in[y1, x1])
    return out


@pytest.mark.parametrize("grid", [(24, 32), (7, 3), (14, 14)])
def test_positional_embedding_resize(grid):
    torch.manual_seed(3)
    pos = torch.randn(1 + 14 * 14, 8, dtype=torch.float64)
    out = resize_positional_embedding(pos, grid)
    assert out.shape == (1 + grid[0] * grid[1], 8)
    assert torch.equal(out[0], pos[0])  # CLS row kept
    ref = _bilinear_reference(pos[1:].reshape(14, 14, 8).numpy(), *grid)
    np.testing.assert_allclose(out[1:].reshape(*grid, 8).numpy(), ref, atol=1e-10)


def test_network_size_follows_clip_es_rule():
    assert network_size((375, 500), 512, 16) == (384, 512)  # REFERENCE §1.1: 500×375 → 512×384
    assert network_size((333, 500), 512, 16) == (336, 512)
    assert network_size((4000, 6000), 512, 16) == (352, 512)  # ceil(4000·512/6000 / 16)·16
    assert network_size((1, 1), 512, 16) == (16, 16)


def test_drop_cls():
    a = torch.arange(16.0).reshape(4, 4)
    assert torch.equal(drop_cls(a), a[1:, 1:])


def _assert_same_model(a: FrozenClip, b: FrozenClip):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_load_plain_state_dict_and_torchscript_archive(tmp_path, small_clip):
    sd = random_clip_state_dict(seed=0, **SMALL_CLIP)
    torch.save(sd, tmp_path / "plain.pt")
    from_plain = load_clip(pretrained=tmp_path / "plain.pt", device="cpu")
    _assert_same_model(from_plain, small_clip)
    assert from_plain.width == 128 and from_plain.num_blocks == 4 and from_plain.patch_size == 16
    assert not any(p.requires_grad for p in from_plain.model.parameters())
    assert not from_plain.model.training

    # An OpenAI-style TorchScript archive (what ViT-B-16.pt is), read without torch.jit.load.
    traced = torch.jit.trace(from_plain.model, (torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)),
                             check_trace=False, strict=False)
    traced.save(str(tmp_path / "jit.pt"))
    assert zipfile.is_zipfile(tmp_path / "jit.pt")
    _assert_same_model(load_clip(pretrained=tmp_path / "jit.pt", device="cpu"), small_clip)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"visual.proj": _Payload()}, f)
    with pytest.raises(ValueError, match="refused|cannot read"):
        read_openai_state_dict(tmp_path / "evil.pt")


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match="visual.proj"):
        load_clip(pretrained=tmp_path / "resnet.pt")
    with pytest.raises(ClipWeightsNotFound, match="not found"):
        load_clip(pretrained=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not an OpenAI-format CLIP state dict: it has no 'visual.conv1.weight'"):
        build_clip({"visual.proj": torch.zeros(2, 2)})


def test_offline_without_weights_says_which_file_to_put_where(tmp_path, monkeypatch):
    from open_clip import pretrained as oc_pretrained

    def no_network(url, cache_dir=None):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(oc_pretrained, "download_pretrained_from_url", no_network)
    with pytest.raises(ClipWeightsNotFound) as err:
        load_clip("ViT-B-16", pretrained="openai", cache_dir=tmp_path / "ckpt")
    message = str(err.value)
    assert "ViT-B-16.pt" in message and str(tmp_path / "ckpt" / "ViT-B-16.pt") in message


def test_openai_uses_the_file_in_the_cache_dir(tmp_path, monkeypatch, small_clip):
    from open_clip import pretrained as oc_pretrained

    monkeypatch.setattr(oc_pretrained, "download_pretrained_from_url",
                        lambda *a, **k: pytest.fail("must not download when the file is present"))
    torch.save(random_clip_state_dict(seed=0, **SMALL_CLIP), tmp_path / "ViT-B-16.pt")
    _assert_same_model(load_clip("ViT-B-16", pretrained="openai", cache_dir=tmp_path, device="cpu"), small_clip)


def test_device_none_picks_cuda_when_present():
    assert backbone.pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert backbone.pick_device("cpu").type == "cpu"
