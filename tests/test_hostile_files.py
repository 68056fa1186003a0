"""Hostile checkpoint files: each is refused with a ValueError naming it, before memory is allocated for
what it claims, and without running or importing anything it names. The files are built here, byte by byte."""
import json
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rfm.backbone import load_clip, random_clip_state_dict, read_openai_state_dict
from rfm.cli import main
from rfm.decoder import Decoder, _safetensors_header, load_decoder

ROOT = Path(__file__).resolve().parents[1]
GROWTH_LIMIT_MB = 500  # the unfixed loaders grew by 2.9 GB (5e8 floats claimed) to 16 GB (4e9) and 4.8 GB (decoder)


# ---------------------------------------------------------------- a pickle written opcode by opcode


class Global:
    """GLOBAL module.name: what a pickle names to call or construct."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class Call:
    """callable(*args) via REDUCE."""

    def __init__(self, func, *args):
        self.func, self.args = func, args


class Obj:
    """cls.__new__(cls) then BUILD with state: how TorchScript pickles a module."""

    def __init__(self, cls: Global, state: dict):
        self.cls, self.state = cls, state


class PersistentId:
    """BINPERSID: the pickle asks the loader for an object by this id."""

    def __init__(self, *pid):
        self.pid = pid


def Storage(key: str, numel: int, storage: str = "FloatStorage") -> PersistentId:
    """A storage reference as torch writes it: ('storage', dtype global, key, location, numel)."""
    return PersistentId("storage", Global("torch", storage), key, "cpu", numel)


def _ops(obj) -> bytes:
    """Protocol-2 opcodes that push ``obj``."""
    if isinstance(obj, bool):
        return b"\x88" if obj else b"\x89"
    if isinstance(obj, int):
        if -2 ** 31 <= obj < 2 ** 31:
            return b"J" + struct.pack("<i", obj)
        raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw
    if isinstance(obj, str):
        raw = obj.encode()
        return b"X" + struct.pack("<I", len(raw)) + raw
    if obj is None:
        return b"N"
    if isinstance(obj, tuple):
        return b"(" + b"".join(map(_ops, obj)) + b"t"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_ops(k) + _ops(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, Global):
        return b"c" + obj.module.encode() + b"\n" + obj.name.encode() + b"\n"
    if isinstance(obj, Call):
        return _ops(obj.func) + _ops(obj.args) + b"R"
    if isinstance(obj, Obj):
        return _ops(obj.cls) + b")\x81" + _ops(obj.state) + b"b"
    if isinstance(obj, PersistentId):
        return _ops(obj.pid) + b"Q"
    raise TypeError(obj)


def pickle_bytes(obj) -> bytes:
    return b"\x80\x02" + _ops(obj) + b"."


def tensor(storage: Storage, size: tuple, stride: tuple, offset: int = 0) -> Call:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)."""
    return Call(Global("torch._utils", "_rebuild_tensor_v2"), storage, offset, size, stride, False,
                Call(Global("collections", "OrderedDict")))


def module(**state) -> Obj:
    return Obj(Global("__torch__.model", "Model"), state)


def torchscript_zip(path: Path, data_pkl: bytes | None, entries: dict[str, bytes] | None = None,
                    compress: bool = False) -> Path:
    """A zip laid out as torch.jit.save writes one: archive/data.pkl, constants.pkl, code/, data/<key>."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        if data_pkl is not None:
            zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/constants.pkl", pickle_bytes(()))
        zf.writestr("archive/code/__torch__/model.py", "class Model(Module):\n  pass\n")
        zf.writestr("archive/version", "3\n")
        for key, raw in (entries or {}).items():
            zf.writestr(f"archive/data/{key}", raw)
    return path


def claiming(numel: int) -> bytes:
    """data.pkl of one float tensor of ``numel`` elements, whose data/0 entry holds only 4 bytes."""
    return pickle_bytes(module(weight=tensor(Storage("0", numel), (numel,), (1,))))


def nested_zip(path: Path, data_pkl: bytes, depth: int) -> list[int]:
    """A zip written by hand whose entry archive/data/i holds the whole local record of entry i+1: each byte of
    the innermost entry is read ``depth`` times (the overlapping-entries zip bomb). Returns the entries' sizes."""
    def local(name: bytes, data: bytes) -> bytes:
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, zlib.crc32(data), len(data), len(data),
                           len(name), 0) + name + data

    storages = [f"archive/data/{i}".encode() for i in range(depth)]
    nested = [b"\0" * 8]
    for name in reversed(storages[1:]):
        nested.insert(0, local(name, nested[0]))
    names, datas = [b"archive/data.pkl", b"archive/constants.pkl", storages[0]], [data_pkl, pickle_bytes(()), nested[0]]
    body, offsets = b"", []
    for name, data in zip(names, datas):
        offsets.append(len(body))
        body += local(name, data)
    for outer in storages[:-1]:  # entry i+1's record starts right after entry i's local header
        offsets.append(offsets[-1] + 30 + len(outer))
    names, datas = names + storages[1:], datas + nested[1:]
    directory = b"".join(
        struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21, zlib.crc32(data), len(data), len(data),
                    len(name), 0, 0, 0, 0, 0, offset) + name
        for name, data, offset in zip(names, datas, offsets))
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(names), len(names), len(directory), len(body), 0)
    path.write_bytes(body + directory + end)
    return [len(data) for data in nested]


# ---------------------------------------------------------------- TorchScript archives


def _hostile_archives(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name → (file, what the refusal must say)."""
    tmp_path.mkdir(exist_ok=True)
    four = {"0": b"\0" * 16}  # one storage of 4 floats
    valid = pickle_bytes(module(weight=tensor(Storage("0", 4), (2, 2), (2, 1))))
    cases = {
        "claims 5e8 floats": (claiming(500_000_000), {"0": b"\0" * 4}, "claims 500000000"),
        "claims 4e9 floats": (claiming(4_000_000_000), {"0": b"\0" * 4}, "claims 4000000000"),
        "storage entry missing": (claiming(4), {}, "no entry archive/data/0"),
        "view past the storage": (pickle_bytes(module(weight=tensor(Storage("0", 4), (100,), (1,)))), four,
                                  "reaches element 100"),
        "view offset past the storage": (pickle_bytes(module(weight=tensor(Storage("0", 4), (2,), (1,), 3))),
                                         four, "reaches element 5"),
        "negative stride": (pickle_bytes(module(weight=tensor(Storage("0", 4), (2,), (-1,), 3))), four,
                            "malformed view"),
        "os.system payload": (pickle_bytes(module(weight=Call(Global("os", "system"), "true"))), four,
                              "os.system"),
        "builtins.eval payload": (pickle_bytes(Call(Global("builtins", "eval"), "1 + 1")), four, "builtins.eval"),
        "no data.pkl": (None, four, "no <archive>/data.pkl"),
        "ends mid-pickle": (valid[: len(valid) // 2], four, "not a CLIP checkpoint"),
        "empty data.pkl": (b"", four, "not a CLIP checkpoint"),
        "malformed persistent id": (pickle_bytes(module(weight=PersistentId("storage"))), four, "persistent id"),
        "tensor on a non-storage": (pickle_bytes(module(weight=tensor((1, 2), (1,), (1,)))), four,
                                    "not on a storage"),
    }
    files = {name: (torchscript_zip(tmp_path / f"{i}.pt", pkl, entries), message)
             for i, (name, (pkl, entries, message)) in enumerate(cases.items())}
    compressed = torchscript_zip(tmp_path / "deflated.pt", valid, four, compress=True)
    files["compressed entries"] = (compressed, "compressed")
    damaged = bytearray(torchscript_zip(tmp_path / "damaged.pt", valid, four).read_bytes())
    at = damaged.index(b"\x80\x02")  # inside data.pkl's bytes: the CRC no longer matches
    damaged[at + 5:at + 15] = b"\xff" * 10
    (tmp_path / "damaged.pt").write_bytes(bytes(damaged))
    files["damaged zip data"] = (tmp_path / "damaged.pt", "damaged")
    truncated = torchscript_zip(tmp_path / "truncated.pt", valid, four).read_bytes()
    (tmp_path / "truncated.pt").write_bytes(truncated[: len(truncated) - 30])
    files["truncated zip"] = (tmp_path / "truncated.pt", "cannot read CLIP checkpoint")  # no zip directory left
    return files


def test_every_hostile_archive_is_a_value_error_naming_the_file(tmp_path):
    for name, (path, message) in _hostile_archives(tmp_path).items():
        with pytest.raises(ValueError) as err:
            read_openai_state_dict(path)
        assert str(path) in str(err.value) and message in str(err.value), (name, str(err.value))
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_clip(pretrained=path, device="cpu")


def test_the_hand_written_pickle_reads_like_a_torchscript_archive(tmp_path):
    """The builders above make archives the reader accepts, so the refusals are about what each file breaks."""
    raw = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    path = torchscript_zip(tmp_path / "ok.pt", pickle_bytes(module(
        weight=tensor(Storage("0", 6), (2, 3), (3, 1)), bias=tensor(Storage("0", 6), (2,), (1,), 4),
        child=module(scale=tensor(Storage("1", 1, "HalfStorage"), (), ())))), {"0": raw, "1": b"\0\x3c"})
    tensors = read_openai_state_dict(path)
    assert tensors.keys() == {"weight", "bias", "child.scale"}
    assert torch.equal(tensors["weight"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(tensors["bias"], torch.tensor([4.0, 5.0]))
    assert tensors["child.scale"].dtype == torch.float16 and float(tensors["child.scale"]) == 1.0


def test_a_module_cycle_or_a_shared_module_tree_is_read_once(tmp_path):
    """2^40 paths through 40 levels of shared modules: each module is visited once, so this returns at once."""
    # BINPUT/POP/BINGET by hand: the module of level i holds the one of level i-1 twice.
    ops = b"\x80\x02" + _ops(module(w=tensor(Storage("0", 1), (1,), (1,)))) + b"q\x000"
    for level in range(1, 41):
        below = b"h" + bytes([level - 1])
        ops += _ops(Global("__torch__.model", "Model")) + b")\x81}(" + _ops("a") + below + _ops("b") + below
        ops += b"ubq" + bytes([level]) + b"0"
    path = torchscript_zip(tmp_path / "shared.pt", ops + b"h\x28.", {"0": b"\0" * 4})
    assert list(read_openai_state_dict(path)) == ["a." * 40 + "w"]
    # a module holding itself
    ops = _ops(Global("__torch__.model", "Model")) + b")\x81q\x00}(" + _ops("self") + b"h\x00"
    ops += _ops("w") + _ops(tensor(Storage("0", 1), (1,), (1,))) + b"ub"
    path = torchscript_zip(tmp_path / "cycle.pt", b"\x80\x02" + ops + b".", {"0": b"\0" * 4})
    assert list(read_openai_state_dict(path)) == ["w"]


def test_overlapping_zip_entries_cannot_multiply_the_file(tmp_path):
    path = tmp_path / "nested.pt"
    sizes = nested_zip(path, b"", 60)
    storages = {f"t{i}": tensor(Storage(str(i), n, "ByteStorage"), (n,), (1,)) for i, n in enumerate(sizes)}
    sizes = nested_zip(path, pickle_bytes(module(**storages)), 60)
    assert sum(sizes) > 3 * path.stat().st_size  # what reading every storage would hold
    with zipfile.ZipFile(path) as zf:  # the entries are well formed, each on its own
        assert zf.read("archive/data/59") == b"\0" * 8 and len(zf.read("archive/data/0")) == sizes[0]
    with pytest.raises(ValueError, match=r"nested\.pt is not a CLIP checkpoint: .*overlapping zip entries"):
        read_openai_state_dict(path)


def test_pickle_payload_never_runs_and_its_module_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "payload-ran"
    (tmp_path / "rfm_hostile_payload.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef run(*a):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    payloads = {
        "system.pt": Call(Global("os", "system"), f"touch {marker}"),
        "eval.pt": Call(Global("builtins", "eval"), f"open({str(marker)!r}, 'w')"),
        "import.pt": Call(Global("rfm_hostile_payload", "run")),
    }
    for name, payload in payloads.items():
        path = torchscript_zip(tmp_path / name, pickle_bytes(module(weight=payload)), {"0": b"\0" * 4})
        with pytest.raises(ValueError, match="refused, not imported"):
            read_openai_state_dict(path)
        assert not marker.exists(), name
    assert "rfm_hostile_payload" not in sys.modules
    # the same payload in a plain (non-TorchScript) pickle goes to torch.load(weights_only=True)
    (tmp_path / "plain.pt").write_bytes(pickle_bytes({"visual.proj": payloads["system.pt"]}))
    with pytest.raises(ValueError, match=r"plain\.pt is not a plain tensor checkpoint"):
        load_clip(pretrained=tmp_path / "plain.pt")
    assert not marker.exists()


def test_tiny_tensors_describing_a_huge_clip_are_refused_before_it_is_built(tmp_path):
    sd = random_clip_state_dict(width=64, layers=1, patch_size=16, image_size=32, embed_dim=64, text_width=64,
                                text_layers=1)
    cases = {
        "wide.pt": ({**sd, "visual.conv1.weight": torch.zeros(1).expand(8192, 3, 16, 16)}, "width 8192"),
        "deep.pt": ({**sd, **{f"visual.transformer.resblocks.{i}.ln_1.weight": torch.zeros(64) for i in range(100)}},
                    "layers 100"),
        "patch.pt": ({**sd, "visual.conv1.weight": torch.zeros(1).expand(64, 3, 1000, 1000)}, "patch_size 1000"),
        "overlapping.pt": ({**sd, "token_embedding.weight": torch.zeros(64).expand(49408, 64)}, "overlapping"),
    }
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / name))}: .*{message}"):
            load_clip(pretrained=tmp_path / name, device="cpu")
    tied = {**sd, "visual.ln_post.weight": sd["visual.ln_pre.weight"]}  # one stored view under two names is fine
    torch.save(tied, tmp_path / "tied.pt")
    assert load_clip(pretrained=tmp_path / "tied.pt", device="cpu").width == 64


# ---------------------------------------------------------------- decoder files


def _decoder_files(folder: Path, config: dict, weights_config: dict | None = None) -> Path:
    """decoder.safetensors of a decoder with ``weights_config`` (default: config) beside a JSON saying ``config``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "decoder.safetensors"
    Decoder(**(weights_config or config)).save(path, overwrite=True)
    (folder / "decoder.json").write_text(json.dumps({"format": "rfm.weclip-decoder", "version": 1,
                                                     "config": config}))
    return path


SMALL = dict(width=16, num_blocks=2, embed_dim=8, num_classes=3, heads=2, layers=1)


@pytest.mark.parametrize("config,message", [
    ({**SMALL, "embed_dim": 4096, "heads": 8}, "embed_dim must be 1..2048, got 4096"),
    ({**SMALL, "layers": 1000}, "layers must be 1..24"),
    ({**SMALL, "num_classes": 10 ** 6}, "num_classes must be 1..10000"),
    ({**SMALL, "width": 10 ** 400}, "width must be"),
    ({**SMALL, "num_blocks": "2"}, "num_blocks must be an integer"),
    ({**SMALL, "heads": 3}, "embed_dim 8 is not divisible by heads 3"),
])
def test_decoder_config_is_checked_before_the_weights(tmp_path, config, message):
    path = _decoder_files(tmp_path, config, SMALL)
    with pytest.raises(ValueError, match=r"decoder\.json: .*" + message):
        load_decoder(path)


def test_safetensors_header_is_checked_before_any_tensor_is_read(tmp_path):
    path = _decoder_files(tmp_path, SMALL)
    good = path.read_bytes()
    length = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + length])

    def write(header_obj=None, raw_header=None, prefix=None, data=None):
        encoded = raw_header if raw_header is not None else json.dumps(header_obj).encode()
        path.write_bytes((prefix if prefix is not None else len(encoded).to_bytes(8, "little")) + encoded
                         + (data if data is not None else good[8 + length:]))

    name = "decoder.linear_pred.bias"
    begin, end = header[name]["data_offsets"]
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    last_begin, last_end = header[last]["data_offsets"]
    cases = [
        (dict(prefix=(10 ** 15).to_bytes(8, "little"), raw_header=b"{}"), "header of 1000000000000000 bytes"),
        (dict(raw_header=b"[not json"), "header is not JSON"),
        (dict(header_obj=[1, 2]), "not a JSON object"),
        (dict(header_obj={**header, name: {**header[name], "shape": [10 ** 9]}}), "do not hold"),
        (dict(header_obj={**header, name: {**header[name], "data_offsets": [begin, end + 4]}}), "do not hold"),
        (dict(header_obj={**header, name: {**header[name], "dtype": "X99"}}), "is not {dtype, shape"),
        (dict(header_obj=header, data=good[8 + length:-4]), "cover"),
        (dict(header_obj={**header, last: {**header[last], "data_offsets": [0, last_end - last_begin]}}),
         "overlap"),
    ]
    for kwargs, message in cases:
        write(**kwargs)
        with pytest.raises(ValueError, match=r"decoder\.safetensors are not a valid safetensors file: .*"
                           + message.replace("{", r"\{").replace("[", r"\[")):
            load_decoder(path)


# ---------------------------------------------------------------- memory, in a fresh interpreter


def _load_growth_mb(call: str) -> tuple[float, str]:
    """Peak-RSS growth (MiB) of a fresh interpreter while it runs ``call`` after importing rfm, and the
    ValueError it raised. Growth, not the peak: importing torch alone takes hundreds of MiB."""
    script = f"""
import json, resource
from pathlib import Path
from rfm.backbone import read_openai_state_dict
from rfm.decoder import load_decoder
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    {call}
    error = ""
except ValueError as err:
    error = str(err)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"growth_kib": after - before, "error": error}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["growth_kib"] / 1024, result["error"]


@pytest.mark.parametrize("numel", [500_000_000, 4_000_000_000])
def test_torchscript_claiming_a_huge_storage_stays_small_in_memory(tmp_path, numel):
    path = torchscript_zip(tmp_path / "claim.pt", claiming(numel), {"0": b"\0" * 4})
    assert path.stat().st_size < 1000
    growth, error = _load_growth_mb(f"read_openai_state_dict(Path({str(path)!r}))")
    assert f"claims {numel}" in error and str(path) in error
    assert growth < GROWTH_LIMIT_MB, growth


def test_decoder_config_claiming_embed_dim_4096_stays_small_in_memory(tmp_path):
    path = _decoder_files(tmp_path, {**SMALL, "embed_dim": 4096, "heads": 8}, SMALL)
    growth, error = _load_growth_mb(f"load_decoder(Path({str(path)!r}))")
    assert "embed_dim must be 1..2048" in error and "decoder.json" in error
    assert growth < GROWTH_LIMIT_MB, growth


def test_safetensors_header_of_a_large_decoder_without_its_data_stays_small_in_memory(tmp_path):
    """The largest config allowed, with a header listing all of its tensors (9 GB) over 16 bytes of data."""
    config = dict(width=4096, num_blocks=64, embed_dim=2048, num_classes=10000, heads=8, layers=24)
    path = _decoder_files(tmp_path, config, SMALL)
    with torch.device("meta"):
        tensors = Decoder(**config).state_dict()
    path.write_bytes(_safetensors_header(tensors, {}) + b"\0" * 16)
    growth, error = _load_growth_mb(f"load_decoder(Path({str(path)!r}))")
    assert "decoder.safetensors are not a valid safetensors file" in error and "cover" in error, error
    assert growth < GROWTH_LIMIT_MB, growth


# ---------------------------------------------------------------- the command line


def test_cli_refuses_hostile_clip_files_in_one_line(tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(image)
    archives = _hostile_archives(tmp_path / "archives")
    for name in ("claims 4e9 floats", "os.system payload", "no data.pkl", "truncated zip", "ends mid-pickle"):
        path = archives[name][0]
        code = main(["run", str(image), "--labels", "cat", "--clip", str(path), "--device", "cpu",
                     "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("rfm: error:"), (name, err)
        assert str(path) in lines[0] and "Traceback" not in err, (name, err)
