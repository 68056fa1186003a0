"""Tests for rfm.decoder: the WeCLIP decoder's maths against explicit computations, and checkpoint
I/O in the project format and in the official WeCLIP layout (REFERENCE §4.1, §4.7)."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from rfm.decoder import FORMAT, FORMAT_VERSION, Decoder, check_compatible, feature_affinity, load_decoder

SMALL = dict(width=24, num_blocks=3, embed_dim=16, num_classes=5, heads=4, layers=2)
# Official checkpoints carry no head count; the loader assumes the official 8.
SMALL_8_HEADS = dict(width=40, num_blocks=5, embed_dim=24, num_classes=7, heads=8, layers=2)


def make_decoder(seed: int = 0, **config) -> Decoder:
    """A decoder with random, non-trivial weights (LayerNorm and biases included), in eval mode."""
    torch.manual_seed(seed)
    decoder = Decoder(**(config or SMALL))
    with torch.no_grad():
        for param in decoder.parameters():
            param.normal_(0.0, 0.3)
    return decoder.eval()


def make_tokens(config: dict, batch: int = 2, grid=(3, 4), seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(config["num_blocks"], batch, grid[0] * grid[1], config["width"], generator=generator)


# ---------------------------------------------------------------- maths
def test_output_shapes():
    decoder = make_decoder()
    tokens = make_tokens(SMALL)
    with torch.no_grad():
        logits, f_u = decoder(tokens, (3, 4))
        assert logits.shape == (2, 5, 3, 4) and f_u.shape == (2, 16, 3, 4)
        assert torch.equal(decoder.fused_features(tokens, (3, 4)), f_u)
        assert feature_affinity(f_u).shape == (2, 12, 12)


def test_feature_affinity_matches_explicit_sigmoid_of_dot_products():
    f_u = torch.randn(2, 5, 3, 2, dtype=torch.float64)
    got = feature_affinity(f_u)
    for b in range(2):
        flat = [f_u[b, :, y, x] for y in range(3) for x in range(2)]  # row-major token order
        for i, fi in enumerate(flat):
            for j, fj in enumerate(flat):
                assert math.isclose(got[b, i, j].item(), 1 / (1 + math.exp(-float(fi @ fj))), rel_tol=1e-12)


def fused_by_hand(state: dict, tokens: torch.Tensor, grid) -> torch.Tensor:
    """F_u from the raw tensors: per-block Linear-ReLU-Linear, concat, 1×1 conv as a matmul."""
    parts = []
    for block, x in enumerate(tokens):
        p = f"decoder_fts_fuse.linears_modulelist.{block}."
        hidden = torch.relu(x @ state[p + "proj.weight"].T + state[p + "proj.bias"])
        parts.append(hidden @ state[p + "proj_2.weight"].T + state[p + "proj_2.bias"])
    concat = torch.cat(parts, dim=-1)  # (B, hw, n·E)
    fuse_w = state["decoder_fts_fuse.linear_fuse.weight"][:, :, 0, 0]
    fused = concat @ fuse_w.T + state["decoder_fts_fuse.linear_fuse.bias"]  # (B, hw, E)
    return fused.transpose(1, 2).reshape(tokens.shape[1], -1, *grid)


def head_by_hand(state: dict, f_u: torch.Tensor, heads: int, layers: int) -> torch.Tensor:
    """The transformer head written out: pre-LN multi-head attention and QuickGELU MLP."""
    batch, dim, h, w = f_u.shape
    x = f_u.flatten(2).transpose(1, 2)  # (B, hw, E)
    head_dim = dim // heads
    for layer in range(layers):
        p = f"decoder.transformer.resblocks.{layer}."
        y = F.layer_norm(x, (dim,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        q, k, v = (y @ state[p + "attn.in_proj_weight"].T + state[p + "attn.in_proj_bias"]).split(dim, dim=-1)
        q, k, v = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(batch, -1, dim)
        x = x + attn @ state[p + "attn.out_proj.weight"].T + state[p + "attn.out_proj.bias"]
        y = F.layer_norm(x, (dim,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        hidden = y @ state[p + "mlp.c_fc.weight"].T + state[p + "mlp.c_fc.bias"]
        hidden = hidden * torch.sigmoid(1.702 * hidden)
        x = x + hidden @ state[p + "mlp.c_proj.weight"].T + state[p + "mlp.c_proj.bias"]
    grid = x.transpose(1, 2).reshape(batch, dim, h, w)
    pred_w = state["decoder.linear_pred.weight"][:, :, 0, 0]
    return torch.einsum("ce,behw->bchw", pred_w, grid) + state["decoder.linear_pred.bias"][:, None, None]


def test_fused_features_match_explicit_matmuls():
    decoder = make_decoder()
    tokens = make_tokens(SMALL)
    state = decoder.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(decoder.fused_features(tokens, (3, 4)), fused_by_hand(state, tokens, (3, 4)))


@pytest.mark.parametrize("grad", [False, True])  # with and without PyTorch's MHA inference fast path
def test_transformer_head_matches_manual_pre_ln_blocks(grad):
    decoder = make_decoder()
    tokens = make_tokens(SMALL)
    state = {k: v.detach() for k, v in decoder.state_dict().items()}
    with torch.set_grad_enabled(grad):
        logits, f_u = decoder(tokens, (3, 4))
    expected = head_by_hand(state, f_u.detach(), SMALL["heads"], SMALL["layers"])
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-4, atol=1e-4)


def test_dropout_is_active_only_in_train_mode():
    decoder = make_decoder()
    tokens = make_tokens(SMALL)
    with torch.no_grad():
        assert torch.equal(decoder.fused_features(tokens, (3, 4)), decoder.fused_features(tokens, (3, 4)))
        decoder.train()
        torch.manual_seed(0)
        dropped = decoder.fused_features(tokens, (3, 4))
    zero_channels = (dropped.flatten(2).abs().sum(-1) == 0).sum()
    assert zero_channels > 0  # Dropout2d zeroes whole channels


def test_half_precision_tokens_are_accepted():
    decoder = make_decoder()
    tokens = make_tokens(SMALL)
    with torch.no_grad():
        out = decoder.fused_features(tokens.half(), (3, 4))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, decoder.fused_features(tokens.half().float(), (3, 4)))


@pytest.mark.parametrize(
    "tokens_shape, grid, match",
    [
        ((4, 2, 12, 24), (3, 4), r"decoder fuses 3 blocks .* got 4"),
        ((3, 2, 12, 32), (3, 4), "token width 24 but got 32"),
        ((3, 2, 13, 24), (3, 4), "13 tokens but grid"),
        ((3, 12, 24), (3, 4), r"\(num_blocks, B, h\*w, width\)"),
        ((3, 2, 12, 24), (3, 0), "grid"),
        ((3, 2, 12, 24), (12,), "grid"),
    ],
)
def test_bad_token_inputs_raise_clear_errors(tokens_shape, grid, match):
    with pytest.raises(ValueError, match=match):
        make_decoder()(torch.zeros(tokens_shape), grid)


def test_constructor_validation():
    with pytest.raises(ValueError, match="not divisible by heads"):
        Decoder(embed_dim=30, heads=8)
    with pytest.raises(ValueError, match="num_blocks must be ≥ 1"):
        Decoder(num_blocks=0)


@pytest.mark.parametrize("num_classes, expected", [(21, 5_985_045), (81, 6_000_465)])
def test_parameter_count_of_official_configs(num_classes, expected):
    decoder = Decoder(num_classes=num_classes)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(decoder) == expected
    assert count(decoder.decoder_fts_fuse) == 3_610_368
    assert decoder.config == dict(width=768, num_blocks=11, embed_dim=256, num_classes=num_classes, heads=8, layers=3)


# ---------------------------------------------------------------- compatibility
def test_check_compatible():
    decoder = Decoder(**SMALL)
    check_compatible(decoder, clip_width=24, clip_blocks=4)
    with pytest.raises(ValueError, match="decoder expects CLIP width 24 but the CLIP has width 512"):
        check_compatible(decoder, clip_width=512, clip_blocks=4)
    with pytest.raises(ValueError, match=r"decoder fuses 3 blocks but the CLIP has 6 blocks \(needs N-1 = 5\)"):
        check_compatible(decoder, clip_width=24, clip_blocks=6)
    with pytest.raises(ValueError, match="width 768.*; decoder fuses 3 blocks"):
        check_compatible(decoder, clip_width=768, clip_blocks=12)


# ---------------------------------------------------------------- project format
def test_save_load_round_trip(tmp_path):
    decoder = make_decoder()
    path = tmp_path / "voc.safetensors"
    decoder.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voc.json", "voc.safetensors"]  # no temp files left
    header = json.loads((tmp_path / "voc.json").read_text())
    assert header == {"format": FORMAT, "version": FORMAT_VERSION, "config": SMALL}
    loaded = load_decoder(path)
    assert not loaded.training and loaded.config == SMALL
    tokens = make_tokens(SMALL)
    with torch.no_grad():
        for a, b in zip(decoder(tokens, (3, 4)), loaded(tokens, (3, 4))):
            assert torch.equal(a, b)


def test_save_refuses_to_overwrite_unless_told(tmp_path):
    path = tmp_path / "d.safetensors"
    make_decoder(seed=0).save(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_decoder(seed=1).save(path)
    assert path.read_bytes() == before
    path.unlink()  # the JSON alone also blocks a save
    with pytest.raises(FileExistsError, match=r"d\.json already exists"):
        make_decoder(seed=1).save(path)
    make_decoder(seed=1).save(path, overwrite=True)
    torch.testing.assert_close(load_decoder(path).state_dict(), make_decoder(seed=1).state_dict())


def test_save_requires_safetensors_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        make_decoder().save(tmp_path / "d.pth")


def test_project_format_errors(tmp_path):
    path = tmp_path / "d.safetensors"
    make_decoder().save(path)
    config_path = tmp_path / "d.json"
    header = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**header, "format": "something-else"}))
    with pytest.raises(ValueError, match="not an RFM decoder config"):
        load_decoder(path)
    config_path.write_text(json.dumps({**header, "version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        load_decoder(path)
    config_path.write_text(json.dumps({**header, "config": {**SMALL, "num_classes": 6}}))
    with pytest.raises(ValueError, match=r"wrong shapes: decoder\.linear_pred\.bias \(5,\) \(expected \(6,\)\)"):
        load_decoder(path)
    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_decoder(path)
    config_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"d\.json not found"):
        load_decoder(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_decoder(tmp_path / "missing.pth")


# ---------------------------------------------------------------- official WeCLIP layout
def official_checkpoint(decoder: Decoder) -> dict:
    """What torch.save(WeCLIP_model.state_dict()) holds (REFERENCE §4.7), with small encoder dummies."""
    state = {
        "encoder.visual.class_embedding": torch.randn(8),
        "encoder.visual.conv1.weight": torch.randn(8, 3, 2, 2).half(),
        "encoder.visual.transformer.resblocks.11.attn.in_proj_weight": torch.randn(24, 8),
        "encoder.visual.transformer.resblocks.11.mlp.c_fc.weight": torch.randn(32, 8).half(),
        "encoder.transformer.resblocks.0.ln_1.weight": torch.randn(8),
        "encoder.logit_scale": torch.tensor(4.6052),
        "encoder.visual.positional_embedding_new": torch.randn(401, 8).half(),
    }
    state.update(decoder.state_dict())
    kernel = torch.zeros(8, 1, 3, 3)
    for k, (y, x) in enumerate((y, x) for y in range(3) for x in range(3) if (y, x) != (1, 1)):
        kernel[k, 0, y, x] = 1
    state["par.kernel"] = kernel
    return state


def assert_same_outputs(a: Decoder, b: Decoder) -> None:
    tokens = make_tokens(a.config)
    with torch.no_grad():
        for x, y in zip(a(tokens, (3, 4)), b(tokens, (3, 4))):
            assert torch.equal(x, y)


@pytest.mark.parametrize(
    "config",
    [
        SMALL_8_HEADS,
        dict(width=768, num_blocks=11, embed_dim=256, num_classes=21, heads=8, layers=3),
    ],
    ids=["small", "voc"],
)
def test_loads_official_checkpoint_and_infers_dimensions(tmp_path, config):
    decoder = make_decoder(**config)
    path = tmp_path / "checkpoint_30000.pth"
    torch.save(official_checkpoint(decoder), path)
    loaded = load_decoder(path)
    assert loaded.config == config and not loaded.training
    assert_same_outputs(decoder, loaded)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"module." + k: v for k, v in s.items()},
        lambda s: {"state_dict": s, "iteration": 30000},
        lambda s: {"model": {"module." + k: v for k, v in s.items()}},
    ],
    ids=["module-prefix", "state_dict-wrapper", "model-wrapper-with-prefix"],
)
def test_loads_wrapped_or_ddp_prefixed_checkpoints(tmp_path, wrap):
    decoder = make_decoder(**SMALL_8_HEADS)
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(official_checkpoint(decoder)), path)
    assert_same_outputs(decoder, load_decoder(path))


def test_half_precision_decoder_weights_load_as_float32(tmp_path):
    decoder = make_decoder(**SMALL_8_HEADS)
    state = {k: v.half() for k, v in official_checkpoint(decoder).items()}
    path = tmp_path / "half.pth"
    torch.save(state, path)
    loaded = load_decoder(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(loaded.state_dict(), {k: v.float() for k, v in decoder.state_dict().items()},
                               rtol=1e-3, atol=1e-3)


class Payload:
    """An arbitrary object: unpickling it would mean running code named by the file."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_checkpoint_with_pickled_object_is_refused(tmp_path, capsys, zip_format):
    path = tmp_path / "evil.pth"
    checkpoint = {**official_checkpoint(make_decoder(**SMALL_8_HEADS)), "extra": Payload()}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pth.*weights_only=True"):
        load_decoder(path)
    assert "this must never run" not in capsys.readouterr().out


def test_missing_and_unexpected_decoder_keys_are_listed(tmp_path):
    state = official_checkpoint(make_decoder(**SMALL_8_HEADS))
    del state["decoder.transformer.resblocks.1.mlp.c_fc.bias"]
    state["decoder.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): decoder\.transformer\.resblocks\.1\.mlp\.c_fc\.bias"
                                         r"; unexpected 1 key\(s\): decoder\.extra_head\.weight"):
        load_decoder(path)


def test_checkpoint_without_decoder_is_refused(tmp_path):
    path = tmp_path / "clip_only.pth"
    torch.save({"encoder.logit_scale": torch.tensor(1.0), "par.kernel": torch.zeros(8, 1, 3, 3)}, path)
    with pytest.raises(ValueError, match="no WeCLIP decoder weights.*encoder.logit_scale"):
        load_decoder(path)


def test_official_checkpoint_whose_width_does_not_split_into_8_heads(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save(official_checkpoint(make_decoder(**{**SMALL_8_HEADS, "embed_dim": 20, "heads": 4})), path)
    with pytest.raises(ValueError, match="embed_dim 20 is not divisible by heads 8"):
        load_decoder(path)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "truncated.pth"
    torch.save(official_checkpoint(make_decoder()), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="could not read .*truncated.pth"):
        load_decoder(path)
    (tmp_path / "text.pth").write_text("hello, not a checkpoint")
    with pytest.raises(ValueError, match="could not read .*text.pth"):
        load_decoder(tmp_path / "text.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state_dict"):
        load_decoder(tmp_path / "list.pth")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_map_location_cuda(tmp_path):
    decoder = make_decoder(**SMALL_8_HEADS)
    path = tmp_path / "d.safetensors"
    decoder.save(path)
    loaded = load_decoder(path, map_location="cuda")
    assert next(loaded.parameters()).is_cuda
    tokens = make_tokens(SMALL_8_HEADS)
    with torch.no_grad():
        logits, f_u = loaded(tokens.cuda(), (3, 4))
        torch.testing.assert_close(logits.cpu(), decoder(tokens, (3, 4))[0], rtol=1e-4, atol=1e-4)
    torch.save(official_checkpoint(decoder), tmp_path / "d.pth")
    assert next(load_decoder(tmp_path / "d.pth", map_location="cuda").parameters()).is_cuda


def test_saved_files_are_plain_safetensors_and_identical_across_processes(tmp_path):
    """The safetensors library writes its metadata in hash order; Decoder.save writes the same bytes every time."""
    script = ("import sys, torch; from rfm.decoder import Decoder; torch.manual_seed(0); "
              f"Decoder(**{SMALL!r}).save(sys.argv[1])")
    root = Path(__file__).resolve().parents[1]
    digests = set()
    for run in ("a", "b"):
        path = tmp_path / run / "d.safetensors"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, cwd=root, timeout=300)
        digests.add(tuple(hashlib.sha256(p.read_bytes()).hexdigest() for p in (path, path.with_suffix(".json"))))
    assert len(digests) == 1
    torch.manual_seed(0)
    expected = Decoder(**SMALL).state_dict()
    weights = tmp_path / "a" / "d.safetensors"
    torch.testing.assert_close(load_file(str(weights)), expected, rtol=0, atol=0)
    with safe_open(str(weights), "pt") as f:
        assert f.metadata() == {"format": FORMAT, "version": str(FORMAT_VERSION)}
    text = weights.with_suffix(".json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True)

    half = tmp_path / "bf16.safetensors"
    make_decoder().to(torch.bfloat16).save(half)
    loaded = load_file(str(half))
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    torch.testing.assert_close(loaded, make_decoder().to(torch.bfloat16).state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(load_decoder(half).state_dict(),
                               {k: v.float() for k, v in loaded.items()}, rtol=0, atol=0)
