"""RFM studio: WeCLIP's Frozen CLIP CAM Refinement on CLIP-ES's initial CAM, with AFA's PAR.

    import rfm
    clip = rfm.load_clip("ViT-B-16", pretrained="openai")
    predictor = rfm.Predictor(clip, vocabulary="voc", decoder=rfm.load_decoder("weclip_voc.pth"))
    predictor.set_image(image, labels=["cat", "dog"])
    result = predictor.refine(rfm.RefineParams(alpha=2, n0=7))
"""
from . import par
from .backbone import load_clip
from .decoder import load_decoder
from .demo import demo_models
from .predictor import Predictor, RefineParams, Result

__all__ = ["load_clip", "load_decoder", "demo_models", "Predictor", "RefineParams", "Result", "par"]
__version__ = "0.1.0"
