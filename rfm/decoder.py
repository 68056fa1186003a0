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
import math
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
        crash never leaves a half-written file. Existing files are kept unless overwrite=True. Both files
        are determined by the weights and config alone (sorted keys, tensors in name order), so their
        hashes identify a decoder.
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"decoder weights must be saved to a .safetensors file, got {str(path)!r}")
        config_path = path.with_suffix(".json")
        if not overwrite:
            for target in (path, config_path):
                if target.exists():
                    raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.state_dict().items()}
        metadata = {"format": FORMAT, "version": str(FORMAT_VERSION)}
        atomic_write(path, lambda f: f.writelines(safetensors_chunks(tensors, metadata)), overwrite)
        save_json({"format": FORMAT, "version": FORMAT_VERSION, "config": self.config}, config_path, overwrite,
                  sort_keys=True)


# safetensors' dtype codes; the header gives each tensor's dtype, shape and [begin, end) byte offsets.
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ITEM_SIZES = {code: dtype.itemsize for dtype, code in _SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100_000_000  # the limit the safetensors library itself enforces


def safetensors_chunks(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]):
    """The bytes of a safetensors file of contiguous CPU ``tensors``, in pieces: the header, then each tensor's
    data in sorted-name order. Always the same bytes for the same tensors and metadata."""
    yield _safetensors_header(tensors, metadata)
    for name in sorted(tensors):
        yield tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes()


def _safetensors_header(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """The bytes of a safetensors file before its data, for `tensors` laid out in sorted-name order.

    The same tensors and metadata always give the same bytes (the safetensors library writes its
    metadata in hash order, which differs between processes): JSON keys are sorted and the header
    is padded with spaces to the format's 8-byte alignment.
    """
    header, offset = {"__metadata__": dict(metadata)}, 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from a safetensors file's header, read without reading any tensor.

    ValueError naming `path` unless the header is well formed and its tensors tile the data exactly
    (each one's byte range matches its dtype and shape, no gaps or overlaps, nothing past the file's end).
    """
    def bad(reason: str) -> ValueError:
        return ValueError(f"decoder weights {path} are not a valid safetensors file: {reason}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or not 2 <= length <= min(size - 8, _MAX_HEADER):
            raise bad(f"a header of {length} bytes does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise bad(f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    header.pop("__metadata__", None)
    shapes, ranges = {}, []
    for name, entry in header.items():
        if not (isinstance(entry, dict) and entry.get("dtype") in _ITEM_SIZES
                and _is_count_list(entry.get("shape")) and _is_count_list(entry.get("data_offsets"))
                and len(entry["data_offsets"]) == 2):
            raise bad(f"entry {name!r} is not {{dtype, shape, data_offsets}}")
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(entry["shape"]) * _ITEM_SIZES[entry["dtype"]]:
            raise bad(f"{name} has offsets {begin}..{end}, which do not hold a {entry['dtype']} "
                      f"tensor of shape {tuple(entry['shape'])}")
        shapes[name] = tuple(entry["shape"])
        ranges.append((begin, end))
    covered = 0
    for begin, end in sorted(ranges):
        if begin != covered:
            raise bad(f"its tensors leave a gap or overlap at byte {min(begin, covered)} of the data")
        covered = end
    if covered != size - 8 - length:
        raise bad(f"its tensors cover {covered} bytes of data but the file holds {size - 8 - length}")
    return shapes


def _is_count_list(value) -> bool:
    """Whether `value` is a list of non-negative ints (JSON booleans excluded)."""
    return isinstance(value, list) and all(map(checks.is_count, value))


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


# Far above the official decoders (ViT-L/14: width 1024, 23 blocks, embed_dim 256), so that a config file
# cannot make the loader build a decoder of many gigabytes before the weights are checked.
_CONFIG_LIMITS = dict(width=4096, num_blocks=64, embed_dim=2048, num_classes=10000, heads=2048, layers=24)


def _limited_config(config: Mapping, source: Path) -> dict:
    """`config` with every value an int within _CONFIG_LIMITS, or ValueError naming `source`."""
    limited = {}
    for name in _CONFIG_KEYS:
        value, limit = config[name], _CONFIG_LIMITS[name]
        try:
            limited[name] = checks.integer(name, value, 1, limit)
        except OverflowError:  # checks.integer compares as a float, and a JSON integer can exceed float range
            raise ValueError(f"{source}: decoder config: {name} must be 1..{limit}, got an integer of "
                             f"{len(str(value))} digits") from None
        except ValueError as exc:
            raise ValueError(f"{source}: decoder config: {exc}") from None
    return limited


def _expected_shapes(config: Mapping, source: Path) -> dict[str, tuple[int, ...]]:
    """Parameter name → shape of a Decoder(**config), built on the meta device so nothing is allocated;
    ValueError naming `source` when config is outside _CONFIG_LIMITS or describes no decoder."""
    config = _limited_config(config, source)
    try:
        with torch.device("meta"):
            decoder = Decoder(**config)
    except ValueError as exc:  # heads that do not divide embed_dim
        raise ValueError(f"{source}: {exc}") from None
    return {name: tuple(value.shape) for name, value in decoder.state_dict().items()}


def _check_shapes(expected: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]], config: Mapping,
                  source: Path) -> None:
    """ValueError naming `source` unless `shapes` has exactly the names and shapes in `expected`, the
    parameters of a Decoder(**config)."""
    missing, unexpected = expected.keys() - shapes.keys(), shapes.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(
            f"{source}: decoder weights do not match a decoder with {dict(config)}: "
            + (f"missing {len(missing)} key(s): {_few(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {len(unexpected)} key(s): {_few(unexpected)}" if unexpected else "")
        )
    wrong = [f"{k} {shapes[k]} (expected {v})" for k, v in expected.items() if shapes[k] != v]
    if wrong:
        raise ValueError(f"{source}: decoder weights have wrong shapes: {_few(wrong, 3)}")


def _build(config: Mapping, state: Mapping[str, Tensor], source: Path) -> Decoder:
    """A Decoder of `config` holding `state`; limit, key or shape mismatches raise a specific error
    before the decoder is allocated."""
    shapes = {name: tuple(value.shape) for name, value in state.items()}
    _check_shapes(_expected_shapes(config, source), shapes, config, source)
    decoder = Decoder(**config)
    decoder.load_state_dict(state)
    return decoder


def _load_project_format(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """Config and tensors of a project-format decoder. The JSON config and the safetensors header are
    checked against each other before any tensor is read, so a hostile pair costs no memory."""
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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
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
    config = _limited_config(config, config_path)
    _check_shapes(_expected_shapes(config, config_path), _safetensors_shapes(path), config, path)
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
