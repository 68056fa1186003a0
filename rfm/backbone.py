"""Frozen CLIP: loading, preprocessing, and a forward pass that exposes every block.

The model is ``rfm.clip_model.CLIPModel`` built from OpenAI-format weights. This module adds what
CLIP-ES and WeCLIP need from it: the positional embedding resized to any grid, the tokens after every
block, and each block's head-averaged attention. open_clip is used for two things only, each behind one
function here: the tokenizer (``_openai_tokenizer``) and downloading OpenAI's weights (``_download_openai``).
"""
from __future__ import annotations

import collections
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import checks
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
    state_dict = read_openai_state_dict(path)
    try:
        _check_clip_size(state_dict)
        model = build_clip(state_dict)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return FrozenClip(model.to(pick_device(device)), name=model_name)


# Far above any released CLIP ViT (ViT-bigG: width 1664, 48 layers), far below what would exhaust a machine.
CLIP_LIMITS = dict(width=4096, layers=64, patch_size=64, grid=64, embed_dim=4096, text_width=4096, text_layers=64,
                   context_length=1024, vocab_size=262144)


def _check_clip_size(state_dict: dict[str, torch.Tensor]) -> None:
    """ValueError unless the CLIP that ``state_dict`` describes can be built without allocating far more than
    the checkpoint holds: every dimension within CLIP_LIMITS, and the distinct tensor views no larger together
    than their storages (a few bytes viewed with stride 0 can take any shape; a view under two names, as tied
    weights are, counts once). Missing tensors are left to build_clip, which names them."""
    try:
        cfg = ClipConfig.from_state_dict(state_dict)
    except KeyError:
        return
    except IndexError:
        raise ValueError("not an OpenAI-format CLIP state dict: a tensor has fewer dimensions than CLIP's") from None
    for name, limit in CLIP_LIMITS.items():
        value = getattr(cfg, name)
        if not 1 <= value <= limit:
            raise ValueError(f"not a CLIP checkpoint: its tensor shapes give {name} {value}, outside 1..{limit}")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state_dict.values()}
    views = {(t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype): t.nbytes
             for t in state_dict.values()}
    viewed = sum(views.values())
    if viewed > sum(storages.values()):
        raise ValueError(f"not a CLIP checkpoint: its tensors view {viewed} bytes of {sum(storages.values())} "
                         f"stored (overlapping views)")


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
    if _is_torchscript_archive(path):
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


def _is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a zip with TorchScript's members (constants.pkl, code/), as OpenAI's files are."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not a CLIP checkpoint: a damaged zip archive ({err})") from None
    return any(n.endswith("/constants.pkl") or n.split("/", 1)[-1].startswith("code/") for n in names)


class _ScriptObject:
    """Stands in for a TorchScript module while its pickled attributes are read."""

    def __init__(self, *args):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


class _Storage(NamedTuple):
    """A storage read from the archive's ``data/<key>`` entry, as ``persistent_load`` hands it to the pickle."""

    data: torch.UntypedStorage
    dtype: torch.dtype
    numel: int


class _PickledTensor(NamedTuple):
    """A checked tensor view. Wrapped because a pickle BUILD on a bare tensor would call Tensor.__setstate__,
    whose set_ resizes the storage to whatever size the pickle asks for; a NamedTuple has no state to set."""

    tensor: torch.Tensor


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_JIT_LIST_BUILDERS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag")


def _identity(x, *args):
    return x


def _rebuild_tensor(storage, offset, size, stride, *rest) -> _PickledTensor:
    """torch._utils._rebuild_tensor_v2 for a restricted unpickler: the view is checked to lie inside its
    storage before it is made, because ``Tensor.set_`` would grow the storage to fit instead of failing."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a tensor is built on {type(storage).__name__}, not on a storage")
    if not (checks.is_count(offset) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(map(checks.is_count, size + stride))):
        raise pickle.UnpicklingError(f"a tensor has a malformed view: offset {offset!r}, size {size!r}, "
                                     f"stride {stride!r}")
    if 0 not in size:
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if end > storage.numel:
            raise pickle.UnpicklingError(f"a tensor of size {size} (stride {stride}, offset {offset}) reaches "
                                         f"element {end} of a storage of {storage.numel}")
    return _PickledTensor(torch.empty(0, dtype=storage.dtype).set_(storage.data, offset, size, stride))


def _stored_entry(zf: zipfile.ZipFile, name: str, archive_size: int) -> zipfile.ZipInfo:
    """The zip entry ``name``, checked to be uncompressed (as torch writes them) and no larger than the archive,
    so reading it never holds more bytes than the file has."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise pickle.UnpicklingError(f"the archive has no entry {name}") from None
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
        raise pickle.UnpicklingError(f"entry {name} is compressed; torch never compresses archive entries")
    if info.file_size > archive_size:
        raise pickle.UnpicklingError(f"entry {name} claims {info.file_size} bytes in a {archive_size}-byte file")
    return info


class _TorchScriptUnpickler(pickle.Unpickler):
    """Reads a TorchScript ``data.pkl``: module objects, tensors and containers only; any other global is
    refused by name before it is imported. Each storage's claimed size is checked against its zip entry,
    and all storages together against the file's size, before an entry is read."""

    def __init__(self, file, zf: zipfile.ZipFile, root: str, archive_size: int):
        super().__init__(file)
        self.zf, self.root, self.archive_size = zf, root, archive_size
        self.storages: dict[str, torch.UntypedStorage] = {}  # a hostile pickle may name one storage many times
        # Entries of a real archive are disjoint parts of the file; a crafted zip can overlap them.
        self.unread = archive_size

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name in _JIT_LIST_BUILDERS:
            return _identity
        raise pickle.UnpicklingError(f"its data.pkl calls {module}.{name}, which a checkpoint never needs "
                                     f"(refused, not imported)")

    def persistent_load(self, pid) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, dtype, key, _location, numel = pid
        if not (isinstance(dtype, torch.dtype) and isinstance(key, str) and checks.is_count(numel)):
            raise pickle.UnpicklingError(f"malformed storage reference {pid!r:.80}")
        name = f"{self.root}/data/{key}"
        info = _stored_entry(self.zf, name, self.archive_size)
        if numel * dtype.itemsize != info.file_size:
            raise pickle.UnpicklingError(f"a storage claims {numel} {dtype} elements ({numel * dtype.itemsize} bytes) "
                                         f"but entry {name} holds {info.file_size} bytes")
        if key not in self.storages:
            if info.file_size > self.unread:
                raise pickle.UnpicklingError(f"its storages add up to more than the file's {self.archive_size} "
                                             f"bytes (overlapping zip entries)")
            self.unread -= info.file_size
            # from_buffer copies, so the storage outlives the open archive
            self.storages[key] = torch.UntypedStorage.from_buffer(self.zf.read(info), dtype=torch.uint8)
        return _Storage(self.storages[key], dtype, numel)


def _read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a TorchScript archive, via a restricted unpickler.

    ``torch.jit.load`` would compile and keep the archive's code; ``torch.load(weights_only=True)``
    refuses TorchScript archives. The archive's ``data.pkl`` only needs tensors, dicts and the module
    objects' attribute dicts, so every other global is refused. Memory stays within the file's size.
    """
    archive_size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            data_pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1), None)
            if data_pkl is None:
                raise pickle.UnpicklingError("the archive has no <archive>/data.pkl")
            with zf.open(_stored_entry(zf, data_pkl, archive_size)) as f:
                top = _TorchScriptUnpickler(f, zf, data_pkl.split("/")[0], archive_size).load()
    except pickle.UnpicklingError as err:  # the refusals above, and pickle's own for malformed data
        raise ValueError(f"{path} is not a CLIP checkpoint: {err}") from None
    except Exception as err:  # a damaged or hostile archive makes zipfile and pickle raise many types
        raise ValueError(f"{path} is not a CLIP checkpoint: its archive is damaged "
                         f"({type(err).__name__}: {err})") from None
    return _collect_tensors(top)


def _collect_tensors(top) -> dict[str, torch.Tensor]:
    """The tensors in the attribute dicts of the module tree under ``top``, keyed by dotted path.

    Each module is visited once: a hostile pickle can make the tree cyclic, or share modules so that the
    number of paths grows exponentially with the depth.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    pending = [("", top)]
    while pending:
        prefix, obj = pending.pop()
        if isinstance(obj, _PickledTensor):
            tensors[prefix[:-1]] = obj.tensor
        elif isinstance(obj, _ScriptObject) and id(obj) not in seen:
            seen.add(id(obj))
            pending.extend((f"{prefix}{name}.", value) for name, value in reversed(obj.state.items()))
    return tensors


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
