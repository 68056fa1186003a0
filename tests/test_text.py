"""Vocabularies and cached text features."""
import pytest
import torch

from rfm.text import COCO, COCO_CATEGORY_IDS, VOC, get_vocabulary, text_features, vocabulary_features


def test_voc_and_coco_follow_clip_es():
    assert len(VOC) == 20 and len(VOC.background) == 25
    assert len(COCO) == 80 and len(COCO.background) == 23 and len(COCO_CATEGORY_IDS) == 80
    assert "keyboard" not in COCO.background and "sign" not in COCO.background
    assert VOC.prompt_names[VOC.index("person")] == "person with clothes,people,human"
    assert COCO.prompt_names[COCO.index("snowboard")] == "sknowboard"  # CLIP-ES's spelling, kept
    assert VOC.prompts(["cat"]) == ["a clean origami cat."]


def test_class_lookup_by_name_prompt_and_index():
    assert VOC.index("cat") == 7 == VOC.index("CAT") == VOC.index(7) == VOC.index("bird avian") + 5
    assert COCO.index("motorbike") == COCO.index("motorcycle") == 3
    assert COCO.index("tvmonitor") == COCO.index("tv") == COCO.index("tvmonitor screen")
    assert COCO.index("pottedplant") == COCO.index("potted plant") and COCO.index("sofa") == COCO.index("couch")
    with pytest.raises(ValueError, match="unknown class 'unicorn'"):
        VOC.index("unicorn")
    with pytest.raises(ValueError, match="outside 0..19"):
        VOC.index(20)


def test_custom_vocabulary_and_background():
    vocab = get_vocabulary("cat, tree ,lamp")
    assert vocab.class_names == ("cat", "tree", "lamp")
    assert "tree" not in vocab.background and "grass" in vocab.background  # a class is never also background
    vocab = get_vocabulary(["cat"], background=["floor", " wall "])
    assert vocab.background == ("floor", "wall")
    with pytest.raises(ValueError, match="at least one class"):
        get_vocabulary(" , ")


def test_text_features_are_normalised_and_cached(small_clip, monkeypatch):
    calls = []
    original = small_clip.encode_text
    monkeypatch.setattr(small_clip, "encode_text", lambda prompts: calls.append(prompts) or original(prompts))
    small_clip.text_cache.clear()
    fg, bg = vocabulary_features(small_clip, VOC)
    assert fg.shape == (20, 64) and bg.shape == (25, 64)
    assert torch.allclose(fg.norm(dim=-1), torch.ones(20), atol=1e-5)
    again, _ = vocabulary_features(small_clip, VOC)
    assert again is fg and len(calls) == 2  # one encode for classes, one for background, then cached
    direct = torch.nn.functional.normalize(original(["a clean origami cat."]), dim=-1)
    assert torch.allclose(fg[7], direct[0], atol=1e-6)
    assert text_features(small_clip, []).shape == (0, 64)
