"""Two Gradio inputs the studio needs to behave differently from the stock ones.

They are subclasses, not per-instance patches: Gradio rebuilds a component for a session from its
class and constructor arguments whenever an event updates it, so an override on the instance is
lost after the first update. Gradio writes ``components.pyi`` beside this file for them (its
custom-component stubs); it is committed so that importing never writes into the package.
"""
from __future__ import annotations

import gradio as gr
from gradio_image_annotation import image_annotator


class OriginalFileAnnotator(image_annotator):
    """The box-drawing image input, handing on the uploaded file itself. The stock preprocessing
    decodes and re-encodes every upload (another JPEG generation, 16-bit clipped to white, an error
    badge for a damaged file); ``rfm.data`` reads the original instead and says what is wrong."""

    @classmethod
    def get_component_class_id(cls) -> str:
        # the frontend is the stock annotator's: Gradio finds its files by this id
        return image_annotator.get_component_class_id()

    def get_block_name(self) -> str:
        return "image_annotator"

    def preprocess_image(self, image) -> str | None:
        return None if image is None else str(image.path)


class LenientSlider(gr.Slider):
    """A slider that passes a typed value outside its range on (the stock check answers with an
    error badge); ``Controls.clamped`` brings it inside and the status says so."""

    def get_block_name(self) -> str:
        return "slider"

    def preprocess(self, payload: float | None) -> float | None:
        return payload
