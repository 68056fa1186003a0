"""Vocabularies (VOC, COCO, user-defined), CLIP-ES prompts, and cached text features."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .synthetic import BACKGROUNDS as SYNTHETIC_BACKGROUND
from .synthetic import CLASSES as SYNTHETIC_CLASSES

TEMPLATE = "a clean origami {}."

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# CLIP-ES renames a few classes in the prompt to disambiguate them (REFERENCE §1.5).
VOC_PROMPTS = (
    "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow", "diningtable",
    "dog", "horse", "motorbike", "person with clothes,people,human", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor screen",
)
VOC_BACKGROUND = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley",
    "bridge", "sign",
)

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COCO_PROMPTS = (
    "person with clothes,people,human", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird avian", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack,bag", "umbrella,parasol", "handbag,purse",
    "necktie", "suitcase", "frisbee", "skis", "sknowboard", "sports ball", "kite", "baseball bat", "glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "dessertspoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair seat",
    "sofa", "pottedplant", "bed", "diningtable", "toilet", "tvmonitor screen", "laptop", "mouse", "remote control",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hairdrier,blowdrier", "toothbrush",
)
COCO_BACKGROUND = tuple(w for w in VOC_BACKGROUND if w not in ("keyboard", "sign"))
# Category ids of the 80 classes in COCO's instances JSON (the 91-id numbering with gaps).
COCO_CATEGORY_IDS = tuple(
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
     35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
     64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90])


@dataclass(frozen=True)
class Vocabulary:
    """Class names, the words CLIP sees for them, and the background words they compete with."""

    name: str
    class_names: tuple[str, ...]
    prompt_names: tuple[str, ...]
    background: tuple[str, ...]
    template: str = TEMPLATE
    aliases: tuple[tuple[str, str], ...] = ()  # (other spelling, class name)

    def __post_init__(self):
        if not self.class_names:
            raise ValueError("a vocabulary needs at least one class")
        if len(self.prompt_names) != len(self.class_names):
            raise ValueError("prompt_names must give one prompt per class")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"duplicate class names in vocabulary {self.name!r}")
        if "{}" not in self.template:
            raise ValueError("the prompt template needs a '{}' where the class name goes")

    def __len__(self) -> int:
        return len(self.class_names)

    def index(self, label: str | int) -> int:
        """0-based index of a class given by index, class name or prompt name (case-insensitive)."""
        if isinstance(label, (int,)) and not isinstance(label, bool):
            if not 0 <= label < len(self.class_names):
                raise ValueError(f"class index {label} is outside 0..{len(self.class_names) - 1} of {self.name}")
            return int(label)
        key = str(label).strip().lower()
        key = next((name.lower() for alias, name in self.aliases if alias == key), key)
        for names in (self.class_names, self.prompt_names):
            for i, n in enumerate(names):
                if n.lower() == key:
                    return i
        raise ValueError(f"unknown class {label!r} for vocabulary {self.name!r}; known: {', '.join(self.class_names)}")

    @property
    def category_ids(self) -> tuple[int, ...]:
        """COCO JSON category id of each class: COCO's own ids for the COCO vocabulary, else index + 1."""
        return COCO_CATEGORY_IDS if self.name == "coco" else tuple(range(1, len(self.class_names) + 1))

    def prompts(self, words: Sequence[str]) -> list[str]:
        return [self.template.format(w) for w in words]


# CLIP-ES spells COCO's classes the VOC way where the two datasets share them; each accepts the other's spelling
_VOC_COCO_SPELLINGS = (("aeroplane", "airplane"), ("motorbike", "motorcycle"), ("sofa", "couch"),
                       ("pottedplant", "potted plant"), ("diningtable", "dining table"), ("tvmonitor", "tv"))
VOC = Vocabulary("voc", VOC_CLASSES, VOC_PROMPTS, VOC_BACKGROUND,
                 aliases=tuple((coco, voc) for voc, coco in _VOC_COCO_SPELLINGS))
COCO = Vocabulary("coco", COCO_CLASSES, COCO_PROMPTS, COCO_BACKGROUND, aliases=_VOC_COCO_SPELLINGS)
# The world of rfm.synthetic: the built-in CLIP was trained on its words, with CLIP-ES's template.
SYNTHETIC = Vocabulary("synthetic", SYNTHETIC_CLASSES, SYNTHETIC_CLASSES, SYNTHETIC_BACKGROUND)
NAMED = {"voc": VOC, "coco": COCO, "synthetic": SYNTHETIC}


def get_vocabulary(spec: str | Vocabulary | Sequence[str] = "voc",
                   background: Sequence[str] | None = None) -> Vocabulary:
    """"voc", "coco", "synthetic", a comma-separated string of class words, a list of words, or a Vocabulary.

    ``background`` replaces the background words. A user-defined vocabulary starts from the VOC
    background list minus any word that is one of its classes.
    """
    if isinstance(spec, Vocabulary):
        vocab = spec
    elif isinstance(spec, str) and spec.strip().lower() in NAMED:
        vocab = NAMED[spec.strip().lower()]
    else:
        words = [w.strip() for w in (spec.split(",") if isinstance(spec, str) else spec)]
        words = [w for w in words if w]
        if not words:
            raise ValueError("a custom vocabulary needs at least one class word")
        seen: dict[str, str] = {}
        for w in words:
            if w.lower() in seen:
                # classes are looked up case-insensitively: the second would never be reachable
                raise ValueError(f"the vocabulary names one class twice: {seen[w.lower()]!r} and {w!r} "
                                 f"(class words are case-insensitive)")
            seen[w.lower()] = w
        lowered = set(seen)
        bg = tuple(w for w in VOC_BACKGROUND if w not in lowered)
        vocab = Vocabulary("custom", tuple(words), tuple(words), bg)
    if background is not None:
        bg = tuple(w.strip() for w in background if w.strip())
        vocab = Vocabulary(vocab.name, vocab.class_names, vocab.prompt_names, bg, vocab.template, vocab.aliases)
    return vocab


def text_features(clip, words: Sequence[str], template: str = TEMPLATE) -> torch.Tensor:
    """(P, E) class embeddings: encode ``template.format(word)``, L2-normalise, average over templates
    (CLIP-ES uses one), L2-normalise again. Cached on the model per (words, template)."""
    key = (tuple(words), template)
    if key not in clip.text_cache:
        if not words:
            feats = torch.zeros((0, clip.model.text_projection.shape[1]), device=clip.device)
        else:
            feats = F.normalize(clip.encode_text([template.format(w) for w in words]), dim=-1)
        clip.text_cache[key] = feats
    return clip.text_cache[key]


def vocabulary_features(clip, vocab: Vocabulary) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, E) class features and (B, E) background features of a vocabulary."""
    return text_features(clip, vocab.prompt_names, vocab.template), text_features(clip, vocab.background, vocab.template)
