"""The WeCLIP decoder (REFERENCE §4.1) and its checkpoint I/O (REFERENCE §4.7).

    F_u  = Dropout2d(Conv1×1(concat_ℓ MLP_ℓ(X_ℓ)))      X_ℓ: patch tokens of CLIP block ℓ = 1..N−1
    A_f  = sigmoid(F_uᵀ F_u)                             (hw × hw) per image
    logits = Conv1×1(Transformer(F_u))                   3 pre-LN layers, no positional encoding

Module and parameter names reproduce the state_dict keys of the official training code
(`decoder_fts_fuse.*`, `decoder.*`), so an official checkpoint loads by filtering its keys.
Two checkpoint formats are read by `load_decoder`:

- the project format: `<stem>.safetensors` (weights) + `<stem>.json` (constructor arguments, format
  tag and version), written by `Decoder.save`;
- anything else: a PyTorch file read with `torch.load(weights_only=True)` only — a checkpoint can
  never run code. A plain state_dict as saved by WeCLIP, optionally wrapped in {'state_dict': …} or
  {'model': …} and/or with a DDP 'module.' prefix. Dimensions are read from the tensor shapes; the
  head count cannot be, and is the official 8.
"""

from __future__ import annotations

import json
import numbers
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks
from .fileio import atomic_write, save_json
from .paths import REMAKE_HINT, SYNTHETIC_DECODER

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "OFFICIAL_HEADS",
    "Decoder",
    "feature_affinity",
    "decoder_file",
    "load_decoder",
    "check_compatible",
    "infer_config",
]

FORMAT = "rfm.weclip-decoder"
FORMAT_VERSION = 1
OFFICIAL_HEADS = 8  # hard-coded in the official DecoderTransformer; not recoverable from shapes
_DECODER_PREFIXES = ("decoder_fts_fuse.", "decoder.")
_CONFIG_KEYS = ("width", "num_blocks", "embed_dim", "num_classes", "heads", "layers")
_BLOCK_KEY = re.compile(r"decoder_fts_fuse\.linears_modulelist\.(\d+)\.proj\.weight")
_LAYER_KEY = re.compile(r"decoder\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight")


class TokenMLP(nn.Module):
    """Per-block projection: y = W₂·ReLU(W₁x + b₁) + b₂, width → E → E, applied per token."""

    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(width, embed_dim)
        self.proj_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, hw, width) → (B, hw, E)
        return self.proj_2(F.relu(self.proj(tokens)))


class FeatureFuse(nn.Module):
    """F_u = Dropout2d(Conv1×1([MLP_1(X_1); …; MLP_n(X_n)])), blocks concatenated in order."""

    def __init__(self, width: int, num_blocks: int, embed_dim: int):
        super().__init__()
        self.linears_modulelist = nn.ModuleList(TokenMLP(width, embed_dim) for _ in range(num_blocks))
        self.linear_fuse = nn.Conv2d(embed_dim * num_blocks, embed_dim, kernel_size=1)
        self.dropout = nn.Dropout2d(0.1)

    def forward(self, block_tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        # block_tokens (n, B, hw, width) → F_u (B, E, h, w)
        projected = torch.cat([mlp(x) for mlp, x in zip(self.linears_modulelist, block_tokens)], dim=-1)
        batch = projected.shape[0]
        stacked = projected.transpose(1, 2).reshape(batch, -1, *grid)  # (B, n·E, h, w)
        return self.dropout(self.linear_fuse(stacked))


class QuickGELU(nn.Module):
    """x · σ(1.702 x), the GELU approximation of OpenAI CLIP that WeCLIP's head reuses."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer layer: x ← x + MHA(LN₁(x)); x ← x + MLP(LN₂(x)), MLP E → 4E → E."""

    def __init__(self, embed_dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(embed_dim, 4 * embed_dim),
                gelu=QuickGELU(),
                c_proj=nn.Linear(4 * embed_dim, embed_dim),
            )
        )
        self.ln_2 = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, E) → (B, L, E)
        normed = self.ln_1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of pre-LN layers over the hw tokens; no positional encoding, no final LN."""

    def __init__(self, embed_dim: int, heads: int, layers: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(embed_dim, heads) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class SegmentationHead(nn.Module):
    """logits = Conv1×1(Transformer(F_u)): (B, E, h, w) → (B, C, h, w)."""

    def __init__(self, embed_dim: int, num_classes: int, heads: int, layers: int):
        super().__init__()
        self.transformer = Transformer(embed_dim, heads, layers)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, f_u: Tensor) -> Tensor:
        batch, channels, h, w = f_u.shape
        tokens = self.transformer(f_u.flatten(2).transpose(1, 2))  # (B, hw, E)
        return self.linear_pred(tokens.transpose(1, 2).reshape(batch, channels, h, w))


class Decoder(nn.Module):
    """The WeCLIP decoder: fuse CLIP blocks 1..num_blocks into F_u, then a transformer head.

    Defaults are the official VOC model on ViT-B/16 (5,985,045 parameters).
    """

    def __init__(
        self,
        width: int = 768,
        num_blocks: int = 11,
        embed_dim: int = 256,
        num_classes: int = 21,
        heads: int = OFFICIAL_HEADS,
        layers: int = 3,
    ):
        super().__init__()
        config = dict(width=width, num_blocks=num_blocks, embed_dim=embed_dim,
                      num_classes=num_classes, heads=heads, layers=layers)
        self._config = {name: checks.integer(name, value, 1) for name, value in config.items()}
        width, num_blocks, embed_dim, num_classes, heads, layers = self._config.values()
        if embed_dim % heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by heads {heads}")
        self.decoder_fts_fuse = FeatureFuse(width, num_blocks, embed_dim)
        self.decoder = SegmentationHead(embed_dim, num_classes, heads, layers)

    @property
    def config(self) -> dict:
        """The constructor arguments (a copy)."""
        return dict(self._config)

    def _check_tokens(self, block_tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        cfg = self._config
        if (not isinstance(grid, Sequence) or len(grid) != 2
                or any(isinstance(g, bool) or not isinstance(g, numbers.Integral) or g < 1 for g in grid)):
            raise ValueError(f"grid must be (h, w) with positive integers, got {grid!r}")
        if not isinstance(block_tokens, Tensor) or block_tokens.ndim != 4:
            raise ValueError(
                f"block_tokens must be a (num_blocks, B, h*w, width) tensor, got "
                f"{tuple(block_tokens.shape) if isinstance(block_tokens, Tensor) else type(block_tokens).__name__}"
            )
        n, _, tokens, width = block_tokens.shape
        if n != cfg["num_blocks"]:
            raise ValueError(
                f"decoder fuses {cfg['num_blocks']} blocks (CLIP blocks 1..{cfg['num_blocks']}) but got "
                f"{n}; pass the patch tokens of blocks 1..N-1 only"
            )
        if width != cfg["width"]:
            raise ValueError(f"decoder expects token width {cfg['width']} but got {width}")
        if tokens != grid[0] * grid[1]:
            raise ValueError(
                f"block_tokens hold {tokens} tokens but grid {tuple(grid)} has {grid[0] * grid[1]}; "
                f"drop the CLS token and check the grid"
            )
        weight = self.decoder_fts_fuse.linear_fuse.weight
        return block_tokens.to(device=weight.device, dtype=weight.dtype)

    def fused_features(self, block_tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """F_u (B, E, h, w) from the patch tokens (num_blocks, B, h·w, width), row-major, no CLS."""
        return self.decoder_fts_fuse(self._check_tokens(block_tokens, grid), (int(grid[0]), int(grid[1])))

    def forward(self, block_tokens: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(logits (B, C, h, w), F_u (B, E, h, w)) from (num_blocks, B, h·w, width) patch tokens."""
        f_u = self.fused_features(block_tokens, grid)
        return self.decoder(f_u), f_u

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write `path` (.safetensors weights) and `<stem>.json` (config, format tag, version).

        Each file is written to a temporary name in the same folder and renamed into place, so a
        crash never leaves a half-written file. Existing files are kept unless overwrite=True.
        """
        from safetensors.torch import save as safetensors_bytes

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"decoder weights must be saved to a .safetensors file, got {str(path)!r}")
        config_path = path.with_suffix(".json")
        if not overwrite:
            for target in (path, config_path):
                if target.exists():
                    raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.state_dict().items()}
        header = {"format": FORMAT, "version": FORMAT_VERSION, "config": self.config}
        weights = safetensors_bytes(tensors, metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
        atomic_write(path, lambda f: f.write(weights), overwrite)
        save_json(header, config_path, overwrite)


def feature_affinity(f_u: Tensor) -> Tensor:
    """A_f = sigmoid(F_uᵀ F_u): (B, E, h, w) → (B, hw, hw)."""
    if not isinstance(f_u, Tensor) or f_u.ndim != 4:
        raise ValueError(f"F_u must be a (B, E, h, w) tensor, got {getattr(f_u, 'shape', type(f_u))}")
    flat = f_u.flatten(2)  # (B, E, hw)
    return torch.sigmoid(flat.transpose(1, 2) @ flat)


def check_compatible(decoder: Decoder, clip_width: int, clip_blocks: int) -> None:
    """Raise ValueError if `decoder` cannot read a CLIP of this width and block count (N − 1 fused)."""
    cfg = decoder.config
    problems = []
    if cfg["width"] != clip_width:
        problems.append(f"decoder expects CLIP width {cfg['width']} but the CLIP has width {clip_width}")
    if cfg["num_blocks"] != clip_blocks - 1:
        problems.append(
            f"decoder fuses {cfg['num_blocks']} blocks but the CLIP has {clip_blocks} blocks "
            f"(needs N-1 = {clip_blocks - 1})"
        )
    if problems:
        raise ValueError("; ".join(problems))


def _few(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def infer_config(state: Mapping[str, Tensor], heads: int = OFFICIAL_HEADS) -> dict:
    """Decoder constructor arguments read from the shapes of a decoder state_dict."""
    blocks = sorted(int(m.group(1)) for k in state if (m := _BLOCK_KEY.fullmatch(k)))
    layers = sorted(int(m.group(1)) for k in state if (m := _LAYER_KEY.fullmatch(k)))
    if not blocks or "decoder.linear_pred.weight" not in state:
        raise ValueError(
            "cannot infer the decoder dimensions: the state_dict lacks "
            "'decoder_fts_fuse.linears_modulelist.0.proj.weight' or 'decoder.linear_pred.weight'"
        )
    if blocks != list(range(len(blocks))) or layers != list(range(len(layers))):
        raise ValueError(f"decoder block/layer indices are not contiguous: fuse {blocks}, transformer {layers}")
    embed_dim, width = state["decoder_fts_fuse.linears_modulelist.0.proj.weight"].shape
    return dict(width=int(width), num_blocks=len(blocks), embed_dim=int(embed_dim),
                num_classes=int(state["decoder.linear_pred.weight"].shape[0]), heads=heads,
                layers=len(layers))


def _build(config: Mapping, state: Mapping[str, Tensor], source: Path) -> Decoder:
    """A Decoder of `config` holding `state`; key or shape mismatches raise a specific error."""
    decoder = Decoder(**config)
    expected = decoder.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(
            f"{source}: decoder weights do not match a decoder with {dict(config)}: "
            + (f"missing {len(missing)} key(s): {_few(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {len(unexpected)} key(s): {_few(unexpected)}" if unexpected else "")
        )
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{source}: decoder weights have wrong shapes: {_few(wrong, 3)}")
    decoder.load_state_dict(state)
    return decoder


def _load_project_format(path: Path) -> tuple[dict, dict[str, Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = path.with_suffix(".json")
    if not config_path.is_file():
        raise FileNotFoundError(
            f"decoder config {config_path} not found: a .safetensors decoder needs the JSON config "
            f"with the same stem beside it (Decoder.save writes both)"
        )
    try:
        header = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"decoder config {config_path} is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not an RFM decoder config (expected format {FORMAT!r})")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format version {header.get('version')!r}; this rfm reads version {FORMAT_VERSION}"
        )
    config = header.get("config")
    if not isinstance(config, dict) or set(config) != set(_CONFIG_KEYS):
        raise ValueError(f"{config_path}: 'config' must hold exactly {list(_CONFIG_KEYS)}, got {config!r}")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"could not read decoder weights {path}: {exc}") from exc
    return config, state


def _official_decoder_state(obj, path: Path) -> dict[str, Tensor]:
    """The decoder_fts_fuse.* / decoder.* tensors of a WeCLIP checkpoint object.

    Accepts a plain state_dict, a {'state_dict': …} or {'model': …} wrapper, and a DDP
    'module.' prefix; every other key (encoder.*, par.kernel, positional_embedding_new) is ignored.
    """
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        name = key.removeprefix("module.") if isinstance(key, str) else key
        if isinstance(name, str) and name.startswith(_DECODER_PREFIXES):
            if not isinstance(value, Tensor):
                raise ValueError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor")
            state[name] = value
    if not state:
        sample = _few([str(k) for k in obj.keys()])
        raise ValueError(
            f"{path} holds no WeCLIP decoder weights (keys starting with 'decoder_fts_fuse.' or "
            f"'decoder.'); its keys include: {sample or 'none'}"
        )
    return state


def decoder_file(spec: str | os.PathLike) -> Path:
    """The checkpoint a decoder spec names: ``"synthetic"`` is the built-in decoder, anything else a path."""
    if str(spec) == "synthetic":
        if not SYNTHETIC_DECODER.is_file():
            raise FileNotFoundError(f"the built-in decoder {SYNTHETIC_DECODER} is missing; {REMAKE_HINT}")
        return SYNTHETIC_DECODER
    return Path(spec)


def load_decoder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Decoder:
    """Load a decoder checkpoint (project .safetensors + .json, or an official WeCLIP .pth);
    ``"synthetic"`` is the built-in decoder of the built-in CLIP (``assets/synthetic/``).

    PyTorch files are read with torch.load(weights_only=True) only; a file that needs to unpickle
    anything but tensors and plain containers is refused. Returns the decoder in eval() mode on
    `map_location`.
    """
    path = decoder_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"decoder checkpoint {path} not found")
    if path.suffix == ".safetensors":
        config, state = _load_project_format(path)
    else:
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only" not in str(exc).lower():
                raise ValueError(f"could not read {path} as a PyTorch checkpoint: {exc}") from exc
            raise ValueError(
                f"refusing to load {path}: it contains Python objects other than tensors, and "
                f"checkpoints are only read with torch.load(weights_only=True) so that they cannot "
                f"run code. Re-save just the state_dict. ({str(exc).splitlines()[0]})"
            ) from exc
        except Exception as exc:  # torch.load reports corrupt files with many exception types
            raise ValueError(
                f"could not read {path} as a PyTorch checkpoint: {type(exc).__name__}: {exc}"
            ) from exc
        state = _official_decoder_state(obj, path)
        config = infer_config(state)
    return _build(config, state, path).to(map_location).eval()
