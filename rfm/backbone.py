"""Frozen CLIP: loading, preprocessing, and a forward pass that exposes every block.

The model is ``rfm.clip_model.CLIPModel`` built from OpenAI-format weights. This module adds what
CLIP-ES and WeCLIP need from it: the positional embedding resized to any grid, the tokens after every
block, and each block's head-averaged attention. open_clip is used for two things only, each behind one
function here: the tokenizer (``_openai_tokenizer``) and downloading OpenAI's weights (``_download_openai``).
"""
from __future__ import annotations

import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .clip_model import CLIPModel, ClipConfig, random_clip_model
from .clip_model import build_clip_model as build_clip  # OpenAI-format state dict → float32 CLIPModel
from .constants import CLIP_MEAN, CLIP_STD
from .paths import CHECKPOINT_DIR, REMAKE_HINT, SYNTHETIC_CLIP


class ClipWeightsNotFound(FileNotFoundError):
    """Raised when CLIP weights are neither on disk nor downloadable. The message is in plain words;
    ``detail`` keeps the underlying error (for logs), when there was one."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail


def pick_device(device=None) -> torch.device:
    """``None`` means CUDA when present, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _openai_tokenizer():
    """OpenAI's BPE tokenizer (context 77), as open_clip ships it."""
    import open_clip

    return open_clip.get_tokenizer("ViT-B-16")


class FrozenClip:
    """A ``CLIPModel`` in eval mode with no trainable parameters, plus its tokenizer."""

    def __init__(self, model: CLIPModel, name: str = "ViT-B-16", tokenizer=None):
        if not isinstance(model, CLIPModel):
            raise TypeError(f"expected an rfm.clip_model.CLIPModel (rfm.backbone.build_clip makes one from an "
                            f"OpenAI-format state dict), got {type(model).__name__}")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.name = name
        self.tokenizer = tokenizer or _openai_tokenizer()
        visual = model.visual
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.width = int(visual.conv1.out_channels)
        self.num_blocks = len(visual.transformer.resblocks)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.text_cache: dict[tuple, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    def to(self, device) -> "FrozenClip":
        device = torch.device(device)
        if device != self.device:
            self.model.to(device)
            self._pos_cache.clear()
            self.text_cache.clear()
        return self

    def positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1 + h·w, D): the pretrained patch grid resized bilinearly (align_corners=False), CLS row kept."""
        if grid not in self._pos_cache:
            pos = self.model.visual.positional_embedding.float()  # (1 + g·g, D)
            self._pos_cache[grid] = resize_positional_embedding(pos, grid)
        return self._pos_cache[grid]

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(P, E) L2-normalised text features."""
        tokens = self.tokenizer(prompts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def resize_positional_embedding(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """pos (1 + g·g, D) → (1 + h·w, D), patch part resized as a (D, g, g) image, bilinear, align_corners=False."""
    g = math.isqrt(pos.shape[0] - 1)
    if g * g != pos.shape[0] - 1:
        raise ValueError(f"positional embedding of {pos.shape[0] - 1} patches is not a square grid")
    cls, patches = pos[:1], pos[1:]
    if tuple(grid) == (g, g):
        return pos
    patches = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=tuple(grid), mode="bilinear", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


@dataclass
class BlockOutputs:
    """What the no-grad part of the image tower produces for one image."""

    tokens: list[torch.Tensor]  # N − 1 tensors (1, 1 + hw, D): the output of blocks 1..N−1
    attn: torch.Tensor  # (N − 1, hw, hw): head-averaged post-softmax attention, CLS row/column dropped
    grid: tuple[int, int]


def embed(clip: FrozenClip, image: torch.Tensor) -> torch.Tensor:
    """image (B, 3, H, W), normalised, H and W multiples of the patch → (B, 1 + hw, D) before block 1."""
    p = clip.patch_size
    if image.shape[-2] % p or image.shape[-1] % p:
        raise ValueError(f"image size {tuple(image.shape[-2:])} is not a multiple of the patch size {p}")
    grid = (image.shape[-2] // p, image.shape[-1] // p)
    return clip.model.visual.embed(image, clip.positional_embedding(grid))


def attention_block(block, x: torch.Tensor, normed: torch.Tensor | None = None):
    """One residual attention block that also returns its head-averaged attention.

    x (B, L, D) → (x' (B, L, D), attn (B, L, L)). ``normed`` lets GradCAM pass the ``ln_1`` output it
    differentiates with respect to.
    """
    x, att = block.attend(x, normed)
    return x, att.probs.mean(dim=-3)


def drop_cls(attn: torch.Tensor) -> torch.Tensor:
    """(…, 1 + hw, 1 + hw) → (…, hw, hw): CLS row and column removed, rows NOT renormalised (REFERENCE §2.1)."""
    return attn[..., 1:, 1:]


@torch.no_grad()
def forward_blocks(clip: FrozenClip, image: torch.Tensor) -> BlockOutputs:
    """Run blocks 1..N−1 without gradients (CLIP-ES caches exactly this; block N runs with GradCAM)."""
    p = clip.patch_size
    grid = (image.shape[-2] // p, image.shape[-1] // p)
    x = embed(clip, image)
    tokens, attn = [], []
    for block in clip.model.visual.transformer.resblocks[:-1]:
        x, a = attention_block(block, x)
        tokens.append(x)
        attn.append(drop_cls(a[0]).float())
    empty = x.new_zeros((0, grid[0] * grid[1], grid[0] * grid[1]))
    return BlockOutputs(tokens=tokens, attn=torch.stack(attn) if attn else empty, grid=grid)


def pooled_image_features(clip: FrozenClip, x: torch.Tensor) -> torch.Tensor:
    """CLIP-ES pooling: ln_post on every token, mean over PATCH tokens (CLS excluded), then proj. (B, L, D) → (B, E)."""
    visual = clip.model.visual
    x = visual.ln_post(x)[:, 1:].mean(dim=1)
    return x @ visual.proj


# ---------------------------------------------------------------- preprocessing


def network_size(image_size: tuple[int, int], max_side: int, patch: int) -> tuple[int, int]:
    """CLIP-ES resize rule: each side → ceil(side·s / patch)·patch with s = min(1, max_side / long side)."""
    h, w = image_size
    s = min(1.0, max_side / max(h, w))
    return (math.ceil(h * s / patch) * patch, math.ceil(w * s / patch) * patch)


def work_size(image_size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The resolution PAR and the pseudo label are computed at: the image itself, or scaled down to max_side."""
    h, w = image_size
    s = min(1.0, max_side / max(h, w))
    return (max(1, round(h * s)), max(1, round(w * s)))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 → (h, w, 3) uint8 with PIL bicubic (what CLIP-ES's torchvision Resize does on PIL images)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))


def to_tensor(image: np.ndarray, mean, std, device=None) -> torch.Tensor:
    """(H, W, 3) uint8 → (1, 3, H, W) float32 normalised with CLIP's mean/std."""
    x = torch.tensor(image, device=device).permute(2, 0, 1).float().div_(255)
    m = torch.tensor(mean, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, device=x.device).view(3, 1, 1)
    return ((x - m) / s).unsqueeze(0)


# ---------------------------------------------------------------- loading


def load_clip(model_name: str = "ViT-B-16", pretrained: str | os.PathLike = "openai", device=None,
              cache_dir: str | os.PathLike | None = None) -> FrozenClip:
    """Load a frozen CLIP.

    ``pretrained="synthetic"`` is the built-in small CLIP trained on ``rfm.synthetic`` scenes
    (``assets/synthetic/clip.pt``, an OpenAI-format state dict read by the same path as any other).
    ``pretrained="openai"`` uses ``<cache_dir>/<model_name>.pt`` when present, else downloads OpenAI's
    file into ``cache_dir`` (default ``checkpoints/``) through open_clip. Any other value is a path to
    an OpenAI-format checkpoint: the TorchScript ``ViT-B-16.pt`` that CLIP-ES and WeCLIP use, or a plain
    state dict; any size, dimensions read from the tensors. Nothing in a checkpoint is executed.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else CHECKPOINT_DIR
    if str(pretrained) == "openai":
        path = cache_dir / f"{model_name}.pt"
        if not path.is_file():
            path = _download_openai(model_name, cache_dir)
    elif str(pretrained) == "synthetic":
        path, model_name = SYNTHETIC_CLIP, "synthetic"
        if not path.is_file():
            raise ClipWeightsNotFound(f"the built-in CLIP {path} is missing; {REMAKE_HINT}")
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise ClipWeightsNotFound(f"CLIP checkpoint not found: {path}")
    model = build_clip(read_openai_state_dict(path))
    return FrozenClip(model.to(pick_device(device)), name=model_name)


def _download_openai(model_name: str, cache_dir: Path) -> Path:
    from open_clip import pretrained as oc_pretrained

    cfg = oc_pretrained.get_pretrained_cfg(model_name, "openai")
    target = cache_dir / f"{model_name}.pt"
    hint = (f"Put OpenAI's {model_name}.pt (the file CLIP-ES and WeCLIP use) at {target}, "
            f"or pass a path to it (--clip PATH / pretrained=PATH).")
    if not cfg or not cfg.get("url"):
        raise ClipWeightsNotFound(f"open_clip knows no OpenAI weights for {model_name!r}. {hint}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        # open_clip shows a progress bar and checks the file's SHA256, which is part of the URL.
        downloaded = Path(oc_pretrained.download_pretrained_from_url(cfg["url"], cache_dir=str(cache_dir)))
    except Exception as err:  # no network, proxy refusal, bad checksum: all mean "bring the file yourself"
        raise ClipWeightsNotFound(f"OpenAI's {model_name} weights are not on this machine and could not be "
                                  f"downloaded (no connection to their server). {hint}",
                                  detail=f"{type(err).__name__}: {err}") from None
    if downloaded != target:
        os.replace(downloaded, target)
    return target


def read_openai_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of an OpenAI-format checkpoint, read without running any code it contains."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n.endswith("/constants.pkl") or n.split("/", 1)[-1].startswith("code/") for n in names):
            return _read_torchscript_tensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} is not a plain tensor checkpoint (refused to unpickle code): {err}") from None
    except Exception as err:
        raise ValueError(f"cannot read CLIP checkpoint {path}: {err}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


class _ScriptObject:
    """Stands in for a TorchScript module while its pickled attributes are read."""

    def __init__(self, *args):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


def _read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a TorchScript archive, via a restricted unpickler.

    ``torch.jit.load`` would compile and keep the archive's code; ``torch.load(weights_only=True)``
    refuses TorchScript archives. The archive's ``data.pkl`` only needs tensors, dicts and the module
    objects' attribute dicts, so every other global is refused.
    """
    with zipfile.ZipFile(path) as zf:
        data_pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1)
        root = data_pkl.split("/")[0]

        def load_storage(pid):
            kind, storage_type, key, _location, numel = pid
            if kind != "storage":
                raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
            dtype = storage_type
            raw = zf.read(f"{root}/data/{key}")
            return torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8), dtype, numel

        def rebuild_tensor(storage, offset, size, stride, *rest):
            untyped, dtype, _numel = storage
            t = torch.empty(0, dtype=dtype)
            t.set_(untyped, offset, size, stride)
            return t

        class Restricted(pickle.Unpickler):
            def find_class(self, module, name):
                if module.startswith("__torch__"):
                    return _ScriptObject
                if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
                    return rebuild_tensor
                if module == "collections" and name == "OrderedDict":
                    import collections
                    return collections.OrderedDict
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _STORAGE_DTYPES[name]
                if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist",
                                                                "build_tensorlist", "restore_type_tag"):
                    return _identity
                raise pickle.UnpicklingError(f"refusing to load {module}.{name} from {path}")

            def persistent_load(self, pid):
                return load_storage(pid)

        with zf.open(data_pkl) as f:
            top = Restricted(f).load()
    tensors: dict[str, torch.Tensor] = {}
    _collect_tensors(top, "", tensors)
    return tensors


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def _identity(x, *args):
    return x


def _collect_tensors(obj, prefix: str, out: dict) -> None:
    if isinstance(obj, _ScriptObject):
        for name, value in obj.state.items():
            _collect_tensors(value, f"{prefix}{name}.", out)
    elif isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj.clone()  # clone: detach from the zip buffer so the file can be closed


def random_clip_state_dict(width: int = 768, layers: int = 12, patch_size: int = 16, image_size: int = 224,
                           embed_dim: int = 512, text_width: int = 512, text_layers: int = 12,
                           seed: int = 0) -> dict[str, torch.Tensor]:
    """An OpenAI-format state dict of a CLIP ViT with random weights (ViT-B/16 shapes by default).

    For tests, benchmarks and the app's demo mode: real weights cannot be downloaded everywhere.
    Widths must be multiples of 64 (OpenAI CLIPs use 64-wide heads).
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    cfg = ClipConfig(width=width, layers=layers, patch_size=patch_size, grid=image_size // patch_size,
                     embed_dim=embed_dim, text_width=text_width, text_layers=text_layers)
    return random_clip_model(cfg, seed).state_dict()


def random_clip(device=None, **kwargs) -> FrozenClip:
    """A frozen CLIP with random weights built through the same OpenAI-format path as real checkpoints."""
    return FrozenClip(build_clip(random_clip_state_dict(**kwargs)).to(pick_device(device)), name="random")
