"""RFM studio: WeCLIP's Frozen CLIP CAM Refinement on CLIP-ES's initial CAM, with AFA's PAR.

    import rfm
    clip = rfm.load_clip("ViT-B-16", pretrained="openai")
    predictor = rfm.Predictor(clip, vocabulary="voc", decoder=rfm.load_decoder("weclip_voc.pth"))
    predictor.set_image(image, labels=["cat", "dog"])
    result = predictor.refine(rfm.RefineParams(alpha=2, n0=7))

Names are imported on first use, so ``import rfm`` (and ``rfm --help``) does not load torch.
"""
from importlib import import_module
from pathlib import Path

_PUBLIC = {"load_clip": "backbone", "load_decoder": "decoder", "demo_models": "demo", "Predictor": "predictor",
           "Result": "predictor", "RefineParams": "params", "official_params": "params", "par": None}

__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    """A public name, or a submodule (``rfm.data``, ``rfm.refine`` …) imported on first access."""
    if name in _PUBLIC and _PUBLIC[name] is not None:
        value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    elif (Path(__file__).parent / f"{name}.py").is_file():
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'rfm' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
