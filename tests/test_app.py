"""The web app without a browser: the session (no Gradio) and the renderer called directly, the
handlers of rfm.ui with their outputs, the API through gradio_client, and two clients at once.
Demo models (small random CLIP + random decoder) stand in for real weights."""
import io
import json
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rfm
import rfm.pipeline
from rfm import viz
from rfm.render import Display, Views, layer_caption, render
from rfm.session import (DISPLAY_SIDE, Controls, FairLock, Models, Session, UserMessage, map_classes,
                         sample_classes, sample_mask, sample_paths)
from rfm.ui import Studio, build_app
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
CHELSEA = ROOT / "assets" / "chelsea.png"  # 451×300, a cat
ASTRONAUT = ROOT / "assets" / "astronaut.png"  # 512×512, a person
VOC_BACKGROUND = ", ".join(rfm.text.get_vocabulary("voc").background)
NAMES = Views.names()


@pytest.fixture(scope="module")
def models():
    return Models.from_demo("cpu")


@pytest.fixture
def studio(models):
    return Studio(models)


def views_of(values) -> dict:
    """{view name: value} of a handler's view outputs (a dict {'__type__': 'update'} is gr.skip())."""
    return dict(zip(NAMES, values))


def skipped(value) -> bool:
    return isinstance(value, dict) and value == {"__type__": "update"}


def analyse(studio, path=CHELSEA, classes=("cat",), boxes=(), session=None, controls=Controls(), view_class=None,
            show_auto=False, kind="VOC", custom="", gt=None, background=VOC_BACKGROUND):
    out = studio.analyse(session, {"image": str(path), "boxes": list(boxes)}, list(classes), kind, custom,
                         background, gt, controls, Display(view_class, show_auto))
    return out[0], views_of(out[1:12]), out[12:]


def rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------- the session, without Gradio


def test_session_module_has_no_gradio():
    for module in ("session", "render"):
        source = (ROOT / "rfm" / f"{module}.py").read_text()
        assert "gradio" not in source.replace("Gradio", ""), module


def test_session_analyse_refine_and_render(models):
    session = Session(models)
    session.analyse(CHELSEA, ["cat"], "voc", VOC_BACKGROUND)
    assert session.result.class_names == ["cat"] and session.upload.stem == "chelsea"
    np.testing.assert_array_equal(session.image, rgb(CHELSEA))  # the file's own pixels
    views = render(session, Display("cat"))
    r = session.result
    np.testing.assert_array_equal(views.initial, viz.overlay_cam(rgb(CHELSEA), r.cam_initial[0]))
    np.testing.assert_array_equal(views.label, viz.overlay_label(rgb(CHELSEA), r.label))
    assert "Classes: cat" in views.status and set(NAMES) - {"layers", "zoom", "affinity"} <= views.changed
    session.refine(Controls(alpha=3))
    again = render(session, Display("cat"))
    # only what α moves is redrawn: the initial CAM, the layer chart and the legend come back as they were
    assert again.changed == {"static", "rfm", "label", "status"}
    assert again.initial is views.initial and again.chart is views.chart


def test_session_errors_are_user_messages(models, tmp_path):
    session = Session(models)
    with pytest.raises(UserMessage, match="Upload an image"):
        session.analyse(None, ["cat"], "voc", None)
    with pytest.raises(UserMessage, match="Choose the classes"):
        session.analyse(CHELSEA, [], "voc", None)
    with pytest.raises(UserMessage, match="unknown class"):
        session.analyse(CHELSEA, ["unicorn"], "voc", None)
    with pytest.raises(UserMessage, match="Nothing to export"):
        session.export_label()
    with pytest.raises(UserMessage, match="Analyse an image first"):
        session.adapt(5, Controls())


# every upload a user may drop: what the status says, and whether views follow
def _jpeg(array, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def _bad_files(folder: Path) -> dict:
    photo = rgb(CHELSEA)
    files = {}
    (folder / "text.jpg").write_bytes(b"this is not an image")
    files["unreadable"] = (folder / "text.jpg", "not an image file", False)
    data = _jpeg(photo)
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    files["truncated"] = (folder / "cut.jpg", "truncated", False)
    (folder / "empty.png").write_bytes(b"")
    files["empty"] = (folder / "empty.png", "empty (0 bytes)", False)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "tiny.png")
    files["tiny"] = (folder / "tiny.png", "16-pixel patch", False)
    ramp = np.tile(np.linspace(30000, 60000, 96, dtype=np.uint16), (64, 1))
    Image.fromarray(ramp).save(folder / "deep.png")
    files["16-bit"] = (folder / "deep.png", "16-bit", True)
    Image.fromarray(photo).convert("CMYK").save(folder / "cmyk.jpg")
    files["cmyk"] = (folder / "cmyk.jpg", "CMYK", True)
    Image.fromarray(photo).convert("P").save(folder / "palette.png")
    files["palette"] = (folder / "palette.png", "palette", True)
    exif = Image.Exif()
    exif[0x0112] = 6
    (folder / "rotated.jpg").write_bytes(_jpeg(photo, exif=exif.tobytes()))
    files["exif"] = (folder / "rotated.jpg", "EXIF orientation", True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1400, 2100, 3), dtype=np.uint8)).save(
        folder / "big.jpg", quality=60)
    files["huge"] = (folder / "big.jpg", "long side 512", True)
    return files


def test_every_upload_gets_one_clear_line_and_the_session_stays_usable(studio, tmp_path):
    session = None
    for case, (path, phrase, usable) in _bad_files(tmp_path).items():
        session, views, _ = analyse(studio, path=path, session=session)
        assert phrase in views["status"], (case, views["status"])
        assert (session.result is not None) == usable, case
        if not usable:
            assert views["status"].count("⚠️") == 1 and views["initial"] is None, case
        else:
            assert views["initial"] is not None and views["status"].count("⚠️") == 0, case
        session, views, _ = analyse(studio, session=session)  # the next upload works
        assert session.result is not None and "Classes: cat" in views["status"], case
    # a 16-bit image is scaled, not clipped to white (the annotator's own conversion made it white)
    session, _, _ = analyse(studio, path=tmp_path / "deep.png", session=session)
    assert 70 < session.image.mean() < 240 and session.image.min() < session.image.max()
    rotated = analyse(studio, path=tmp_path / "rotated.jpg")[0].image
    assert rotated.shape == (451, 300, 3)  # turned as viewers show it


def test_the_pipeline_uses_the_uploaded_files_own_pixels(studio, voc_mini):
    path = next((voc_mini / "JPEGImages").iterdir())
    session, _, _ = analyse(studio, path=path, classes=("person",))
    np.testing.assert_array_equal(session.image, rgb(path))  # not a re-encoded copy


def test_controls_clamp_typed_values_with_a_note(studio):
    controls, notes = Controls(alpha=9, n0=0, box_threshold=1.5, par_iterations=-3).clamped(12)
    assert (controls.alpha, controls.n0, controls.box_threshold, controls.par_iterations) == (4, 1, 0.95, 0)
    assert "α = 9 is outside 1..4: using 4" in notes and len(notes) == 4
    assert Controls(n0=13).clamped(12)[0].n0 == 12 and Controls().clamped(12) == (Controls(), [])
    assert Controls(alpha=None).clamped(12)[1] == ["α was empty: using 2"]  # the default
    session, _, _ = analyse(studio)
    out = studio.refine(session, Controls(alpha=9), Display("cat"))
    views = views_of(out[1:12])
    assert "using 4" in views["status"] and session.result.params.alpha == 4
    assert out[12] == 4 and all(skipped(v) for v in out[13:])  # the α slider shows 4; the others untouched


def test_coco_switches_to_its_settings_and_respells_voc_classes(studio):
    classes, background, custom, threshold, n0 = studio.choose_vocabulary("COCO", "", ["cat", "diningtable"])
    assert classes["value"] == ["cat", "dining table"] and len(classes["choices"]) == 80
    assert (threshold, n0) == (0.7, 3) and custom["visible"] is False
    assert background == ", ".join(rfm.text.get_vocabulary("coco").background)
    classes, _, _, threshold, n0 = studio.choose_vocabulary("VOC", "", ["dining table", "tv"])
    assert classes["value"] == ["diningtable", "tvmonitor"] and (threshold, n0) == (0.4, 7)
    assert studio.reset_controls("COCO", "") == Controls(n0=3, box_threshold=0.7).values()
    assert studio.reset_controls("VOC", "") == (2, 7, 8, 0.4, 1.0, 20, "abs")


def test_custom_vocabulary_on_a_fresh_page_is_not_an_error(studio):
    # the hidden words box sends None: this raised a TypeError and put error badges on the page
    classes, background, custom, threshold, n0 = studio.choose_vocabulary("custom", None, None)
    assert classes["choices"] == [] and background == "" and custom["visible"] is True
    assert skipped(threshold) and skipped(n0)
    classes, _, _, _, _ = studio.choose_vocabulary("custom", "lamp, mug", [])
    assert classes["choices"] == ["lamp", "mug"]
    session, views, _ = analyse(studio, kind="custom", custom=None, classes=("lamp",))
    assert "at least one class word" in views["status"] and session.result is None


def test_vocabulary_and_class_choices(studio):
    annotator, view_class = studio.choose_classes("VOC", "", ["cat", "dog"], "dog")
    assert annotator["label_list"] == ["cat", "dog"]
    # the VOC colours (64, 0, 0) and (64, 0, 128) brightened so they read on a heatmap
    assert annotator["label_colors"] == ["#ff0000", "#8000ff"] and view_class["value"] == "dog"


def test_custom_vocabulary_and_background_words(studio):
    session, _, _ = analyse(studio, classes=("kitten",), kind="custom", custom="kitten, sofa",
                            background="floor, wall")
    assert session.predictor.vocabulary.class_names == ("kitten", "sofa")
    assert session.predictor.vocabulary.background == ("floor", "wall")
    assert session.result.class_names == ["kitten"]


def test_samples_suggest_their_classes_and_scenes_their_masks(studio):
    paths = sample_paths()
    index = [p.stem for p in paths].index("chelsea")
    value, classes, mask = studio.pick_sample("VOC", "", types.SimpleNamespace(index=index))
    assert value == {"image": str(CHELSEA), "boxes": []} and classes["value"] == ["cat"] and mask is None
    index = [p.stem for p in paths].index("coffee")
    _, classes, _ = studio.pick_sample("COCO", "", types.SimpleNamespace(index=index))
    assert classes["value"] == ["cup", "spoon", "dining table"]
    _, classes, _ = studio.pick_sample("VOC", "", types.SimpleNamespace(index=index))
    assert classes["value"] == ["diningtable"]  # VOC has no cup or spoon
    _, classes, mask = studio.pick_sample("Synthetic", "", types.SimpleNamespace(index=0))
    assert mask == str(sample_mask(paths[0])) and classes["value"] == list(sample_classes(paths[0]))
    assert map_classes(["tv", "Dining Table", "nothing"], rfm.text.get_vocabulary("voc")) == ("tvmonitor",
                                                                                              "diningtable")


# ---------------------------------------------------------------- handlers


def test_analyse_draws_every_view_at_the_image_size(studio):
    session, views, (view_class, replay, losses, *clamped) = analyse(studio)
    image = rgb(CHELSEA)
    for name in ("initial", "static", "rfm", "label"):
        assert views[name].shape == image.shape and views[name].dtype == np.uint8
    r = session.result
    np.testing.assert_array_equal(views["initial"], viz.overlay_cam(image, r.cam_initial[0]))
    assert views["rfm_missing"]["visible"] is False
    assert "random weights — heatmaps are meaningless" in views["status"]
    assert "rgb(64, 0, 0)" in views["legend"] and "cat" in views["legend"]  # VOC colour of cat (label 8)
    assert views["chart"].ndim == 3 and views["layers"] == [] and views["zoom"] is None
    assert view_class["choices"] == ["cat"] and view_class["value"] == "cat"
    assert replay["visible"] is False and losses is None and all(skipped(v) for v in clamped)


def test_slider_change_refines_without_the_clip_forward_and_sends_only_what_changed(studio, monkeypatch):
    session, before, _ = analyse(studio)

    def forbidden(*args, **kwargs):
        raise AssertionError("a slider change must not rerun CLIP")

    monkeypatch.setattr(rfm.pipeline, "forward_blocks", forbidden)
    monkeypatch.setattr(rfm.pipeline, "initial_cam", forbidden)
    after = views_of(studio.refine(session, Controls(alpha=3), Display("cat"))[1:12])
    assert session.result.params.alpha == 3
    assert not np.array_equal(before["static"], after["static"])
    assert skipped(after["initial"]) and skipped(after["chart"]) and skipped(after["legend"])
    n0_changed = views_of(studio.refine(session, Controls(alpha=3, n0=10), Display("cat"))[1:12])
    assert np.isnan(session.result.layer_scores[:9]).all() and np.isfinite(session.result.layer_scores[9:]).all()
    assert not skipped(n0_changed["chart"]) and skipped(n0_changed["static"])  # N0 is RFM's knob only
    assert not np.array_equal(after["rfm"], n0_changed["rfm"])


def test_a_superseded_refine_is_dropped_unrun(studio):
    session, _, _ = analyse(studio)
    results = {}
    with session.lock:  # both requests wait here, as events racing each other do
        threads = [threading.Thread(target=lambda a=a: results.update({a: studio.refine(session, Controls(alpha=a),
                                                                                       Display("cat"))}))
                   for a in (3, 4)]
        threads[0].start()
        time.sleep(0.2)
        threads[1].start()
        time.sleep(0.2)
    for t in threads:
        t.join()
    assert all(skipped(v) for v in results[3][1:])
    assert session.result.params.alpha == 4 and not skipped(results[4][2])


def test_class_change_reuses_the_backbone(studio, monkeypatch):
    session, _, _ = analyse(studio)
    calls = []
    monkeypatch.setattr(session.predictor, "set_image", lambda *a, **k: calls.append("set_image"))
    original = session.predictor.set_labels
    monkeypatch.setattr(session.predictor, "set_labels", lambda labels: (calls.append("set_labels"), original(labels)))
    session, views, (view_class, *_) = analyse(studio, classes=("cat", "dog"), session=session, view_class="cat")
    assert calls == ["set_labels"]
    assert session.result.class_names == ["cat", "dog"] and view_class["value"] == "cat"
    views = views_of(studio.render(session, Display("dog"))[1:])
    np.testing.assert_array_equal(views["static"], viz.overlay_cam(rgb(CHELSEA), session.result.cam_static[1]))


def test_a_user_box_confines_its_class_and_hides_its_automatic_boxes(studio):
    box = {"label": "cat", "xmin": 100, "ymin": 60, "xmax": 260, "ymax": 200, "color": (255, 0, 0)}
    session, views, _ = analyse(studio, boxes=[box], show_auto=True, view_class="cat")
    assert session.boxes == {"cat": [(100.0, 60.0, 260.0, 200.0)]}
    r = session.result
    outside = np.ones(r.image_size, bool)
    outside[60:200, 100:260] = False
    assert r.cam_static[0][outside].max() == 0 and r.cam_rfm[0][outside].max() == 0
    assert not (r.label[outside] == 8).any() and (r.label[~outside] == 8).any()
    blank = viz.overlay_cam(rgb(CHELSEA), np.zeros(r.image_size, np.float32))
    far = outside.copy()
    far[40:220, 80:280] = False  # the box outline and its name tag are drawn around the box
    # with "show automatic boxes" on, nothing is drawn outside the user's box: its class's own auto boxes are hidden
    assert r.auto_boxes["cat"]
    np.testing.assert_array_equal(views["static"][far], blank[far])
    inner = np.zeros(r.image_size, bool)
    inner[75:190, 110:250] = True
    assert not np.array_equal(views["static"][inner], blank[inner])


def test_boxes_are_clamped_and_unlabelled_ones_wait_for_a_label(studio):
    boxes = [{"label": "cat", "xmin": -20, "ymin": 10, "xmax": 9999, "ymax": 100},
             {"label": "", "xmin": 5, "ymin": 5, "xmax": 50, "ymax": 50},
             {"label": "dog", "xmin": 5, "ymin": 5, "xmax": 50, "ymax": 50}]
    session, views, _ = analyse(studio, boxes=boxes)
    assert session.boxes == {"cat": [(0.0, 10.0, 451.0, 100.0)]} and session.result is not None
    assert "'dog' is ignored" in views["status"]


def test_a_rotated_annotator_view_is_refused(studio):
    out = studio.analyse(None, {"image": str(CHELSEA), "boxes": [], "orientation": 1}, ["cat"], "VOC", "",
                         VOC_BACKGROUND, None, Controls(), Display())
    assert "not supported" in out[11] and out[0].result is None


def test_automatic_boxes_are_legible_on_a_heatmap(studio):
    session, plain, _ = analyse(studio)
    boxed = views_of(studio.render(session, Display("cat", True))[1:])
    expected = viz.draw_labelled_boxes(plain["static"], session.result.auto_boxes["cat"], (255, 255, 255), "auto")
    np.testing.assert_array_equal(boxed["static"], expected)
    assert not np.array_equal(boxed["static"], plain["static"])
    # a black outline under the colour: the dark VOC red of cat stays visible on JET's dark blue
    image = np.zeros((40, 60, 3), np.uint8)
    image[:] = (0, 0, 128)
    drawn = viz.draw_labelled_boxes(image, [(10, 20, 50, 35)], viz.display_color((64, 0, 0)), "cat")
    assert tuple(drawn[34, 30]) == (255, 0, 0) and (drawn[36, 30] == 0).all()
    assert viz.display_color((64, 0, 128)) == (128, 0, 255) and viz.display_color((0, 0, 0)) == (255, 255, 255)


def test_inspecting_a_pixel_fills_the_layer_gallery_with_readable_scores(studio):
    session, _, _ = analyse(studio)
    views = views_of(studio.inspect(session, 200, 150, Display("cat"))[1:])
    r = session.result
    assert len(views["layers"]) == session.predictor.num_blocks == 12
    n = np.prod(r.patch.cam_initial.shape[1:])
    finite = r.layer_scores[6:]
    for l, (tile, caption) in enumerate(views["layers"], start=1):
        assert caption.startswith(f"l={l} ")
        assert tile.shape[0] / tile.shape[1] == pytest.approx(300 / 451, abs=0.05)  # the image's aspect ratio
        if l < 7:
            assert caption == f"l={l} · not a candidate (l < N0 = 7)"
        else:
            margin = (r.layer_scores[l - 1] - finite.mean()) / n ** 2
            assert f"ΔS/pair {margin:+.3e}" in caption and f"S/pair {r.layer_scores[l - 1] / n ** 2:.6f}" in caption
            assert ("· kept ·" in caption) == bool(r.layer_keep[l - 1]) == (margin < 0)  # abs: below the threshold
    assert "ΔS^l per pair vs threshold" in views["status"]
    rows = session.predictor.attention_rows(200, 150)
    small = viz.thumbnail(rgb(CHELSEA), 192)
    point = (200 * small.shape[1] / 451, 150 * small.shape[0] / 300)
    np.testing.assert_array_equal(views["layers"][0][0], viz.attention_tile(small, rows.layers[0], point,
                                                                             viz.INACTIVE_RGB))
    # a click on tile 9 enlarges it beside A_f, at the same size
    zoomed = views_of(studio.zoom_layer(session, "cat", False, types.SimpleNamespace(index=8))[1:])
    assert zoomed["zoom"].shape == views["affinity"].shape and skipped(zoomed["affinity"])
    assert tuple(zoomed["zoom"][0, 0]) == (viz.KEPT_RGB if r.layer_keep[8] else viz.REJECTED_RGB)
    # the gallery follows later refinements (N0 changes which layers are candidates)
    views = views_of(studio.refine(session, Controls(n0=3), Display("cat"))[1:12])
    assert "not a candidate" not in views["layers"][2][1] and "not a candidate" in views["layers"][1][1]


def test_layer_margins_are_per_pair_distances_to_the_threshold():
    scores = np.array([np.nan, np.nan, 10.0, 14.0, 12.0])
    np.testing.assert_allclose(rfm.refine.layer_margins(scores, 2), [np.nan, np.nan, -0.5, 0.5, 0.0])
    assert np.isnan(rfm.refine.layer_margins(np.full(3, np.nan), 4)).all()


def test_inspecting_outside_the_image_is_a_message(studio):
    session, _, _ = analyse(studio)
    views = views_of(studio.inspect(session, 5000, 10, Display("cat"))[1:])
    assert "outside" in views["status"] and session.pixel is None


def test_large_image_is_shown_small_but_exported_full_size(studio, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).save(big)
    session, views, _ = analyse(studio, path=big)
    assert max(views["initial"].shape[:2]) == DISPLAY_SIDE
    assert session.result.image_size == (1200, 1600) and "1600×1200 image: analysed at long side 512" in views["status"]
    out = studio.select_pixel(session, "cat", False, types.SimpleNamespace(index=[384, 288]))
    assert out[:2] == (800, 600) and session.pixel == (800, 600)
    _, path = studio.export_label(session)
    label = Image.open(path)
    assert label.mode == "P" and label.size == (1600, 1200)


def test_exports(studio):
    session, _, _ = analyse(studio, classes=("cat", "dog"))
    r = session.result
    _, label_path = studio.export_label(session)
    label = Image.open(label_path)
    assert label.mode == "P" and label.size == (451, 300)
    np.testing.assert_array_equal(np.asarray(label), r.label)
    assert Path(label_path).parent == session.folder

    _, cams_path = studio.export_cams(session)
    cams = np.load(cams_path, allow_pickle=True).item()
    assert cams["keys"].tolist() == [7, 11]
    np.testing.assert_allclose(cams["attn_highres"], r.cam_rfm, atol=1e-3)
    np.testing.assert_allclose(cams["highres"], r.cam_initial, atol=1e-3)

    from pycocotools import mask as mask_utils

    _, coco_path = studio.export_coco(session)
    doc = json.loads(Path(coco_path).read_text())
    assert doc["categories"] == [{"id": 8, "name": "cat"}, {"id": 12, "name": "dog"}]
    assert doc["images"][0] == {"id": 0, "file_name": "chelsea.png", "height": 300, "width": 451}
    for ann in doc["annotations"]:
        rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
        np.testing.assert_array_equal(mask_utils.decode(rle), r.label == ann["category_id"])

    _, figure_path = studio.export_figure(session)
    assert Image.open(figure_path).format == "PNG"
    folder = session.folder
    session.close()
    assert not folder.exists() and session.result is None  # the tab closed: features and files freed


def test_coco_vocabulary_exports_coco_category_ids(studio):
    session, _, _ = analyse(studio, classes=("cat",), kind="COCO")
    _, coco_path = studio.export_coco(session)
    doc = json.loads(Path(coco_path).read_text())
    assert doc["categories"] == [{"id": 17, "name": "cat"}]  # COCO's id for cat, not index + 1 = 16


def test_exports_without_a_result_warn(studio):
    assert studio.export_label(None)[1] is None
    session = Session(studio.models)
    assert studio.export_cams(session) == (session, None)


def test_add_to_dataset_writes_voc_layout_and_counts_images_not_writes(studio, tmp_path, voc_mini, monkeypatch):
    monkeypatch.chdir(tmp_path)
    session, _, _ = analyse(studio)
    _, status = studio.add_to_dataset(session, "dataset", "", False)
    root = tmp_path / "dataset"
    assert f"`{root}`" in status  # the absolute folder, not the relative one typed
    assert "1 labelled image" in status and "1 image(s) added in this session" in status
    label_file = root / "SegmentationClass" / "chelsea.png"
    assert Image.open(label_file).mode == "P" and Image.open(root / "JPEGImages" / "chelsea.jpg").format == "JPEG"
    assert (root / "ImageSets" / "Segmentation" / "train.txt").read_text() == "chelsea\n"
    before = label_file.read_bytes()
    studio.refine(session, Controls(alpha=4, par_iterations=0), Display("cat"))
    _, status = studio.add_to_dataset(session, str(root), "chelsea", False)
    assert "Not saved" in status and label_file.read_bytes() == before
    _, status = studio.add_to_dataset(session, str(root), "chelsea", True)
    assert "1 labelled image" in status and label_file.read_bytes() != before
    assert "1 image(s) added in this session" in status  # an overwrite is not a new image
    # a JPEG upload goes in byte for byte
    photo = next(p for p in (voc_mini / "JPEGImages").iterdir() if p.suffix == ".jpg")
    session, _, _ = analyse(studio, path=photo, classes=("person",), session=session)
    _, status = studio.add_to_dataset(session, str(root), "", False)
    assert "2 labelled image" in status and "2 image(s) added" in status
    assert (root / "JPEGImages" / f"{photo.stem}.jpg").read_bytes() == photo.read_bytes()
    assert (root / "ImageSets" / "Segmentation" / "train.txt").read_text() == f"chelsea\n{photo.stem}\n"


def test_unreadable_image_is_a_message(studio, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    session, views, _ = analyse(studio, path=broken)
    assert views["status"].count("⚠️") == 1 and session.result is None and "broken.png" in views["status"]


def test_an_unexpected_failure_is_a_status_line_not_an_error(studio, monkeypatch):
    session, _, _ = analyse(studio)
    monkeypatch.setattr(session.predictor, "refine", lambda params: 1 / 0)
    out = studio.refine(session, Controls(alpha=3), Display("cat"))
    assert "Something went wrong (ZeroDivisionError" in views_of(out[1:12])["status"]


def test_without_decoder_the_rfm_view_explains(models):
    studio = Studio(Models(models.clip, None))
    session, views, _ = analyse(studio)
    assert views["rfm"] is None and views["rfm_missing"]["visible"] is True
    assert session.result.cam_rfm is None and "demo" not in views["status"].lower()
    assert "not scored (no decoder)" in layer_caption(session.result, 9)
    _, cams_path = studio.export_cams(session)
    np.testing.assert_allclose(np.load(cams_path, allow_pickle=True).item()["attn_highres"],
                               session.result.cam_static, atol=1e-3)


def test_missing_weights_banner_in_plain_words_then_demo_mode(tmp_path, monkeypatch):
    models = Models.load(clip=str(tmp_path / "ViT-B-16.pt"), device="cpu")
    assert models.clip is None and str(tmp_path / "ViT-B-16.pt") in models.error
    import open_clip.pretrained

    import rfm.backbone as backbone

    def offline(url, cache_dir):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", offline)
    monkeypatch.setattr(backbone, "CHECKPOINT_DIR", tmp_path)
    offline_models = Models.load(clip="openai", device="cpu")
    assert "could not be downloaded" in offline_models.error and "urlopen" not in offline_models.error
    assert "OSError" not in Studio(offline_models).banners()[2]
    studio = Studio(models)
    demo_banner, weights_banner, message = studio.banners()
    assert demo_banner["visible"] is False and weights_banner["visible"] is True
    assert str(tmp_path / "ViT-B-16.pt") in message
    session, views, _ = analyse(studio)
    assert "No CLIP weights" in views["status"] and session.result is None
    demo_banner, weights_banner, _ = studio.enable_demo()
    assert demo_banner["visible"] is True and weights_banner["visible"] is False
    session, views, _ = analyse(studio, session=session)
    assert session.result is not None and "heatmaps are meaningless" in views["status"]


def test_command_line_defaults():
    sys.path.insert(0, str(ROOT))
    import app

    args = app.build_parser().parse_args([])
    assert (args.host, args.port, args.share, args.demo, args.max_side, args.clip) == (
        "127.0.0.1", 7860, False, False, 512, "auto")


# ---------------------------------------------------------------- live scores against a ground-truth mask


def _iou(pred, gt, c):
    valid = gt != 255
    inter = ((pred == c) & (gt == c) & valid).sum()
    union = (((pred == c) | (gt == c)) & valid).sum()
    return inter / union


def test_live_scores_against_a_scene_mask(models):
    studio = Studio(models)
    path = sample_paths()[0]
    classes = sample_classes(path)
    mask = sample_mask(path)
    session, views, _ = analyse(studio, path=path, classes=classes, kind="Synthetic", gt=str(mask),
                                background=", ".join(rfm.text.get_vocabulary("synthetic").background))
    gt = np.asarray(Image.open(mask)).astype(int)
    r = session.result
    c = r.class_indices[0] + 1
    scores = session.scores(classes[0])
    assert scores.iou["label"] == pytest.approx(_iou(r.label, gt, c))
    # the initial CAM as a label: [(1 − max CAM)^p; CAMs], argmax, background first on ties
    cams = r.cam_initial
    pred = np.where((1 - cams.max(0)) >= cams.max(0), 0, np.asarray(r.class_indices)[cams.argmax(0)] + 1)
    assert scores.iou["initial"] == pytest.approx(_iou(pred, gt, c))
    present = sorted({0, *(k + 1 for k in r.class_indices), *np.unique(gt[gt != 255]).tolist()})
    assert scores.miou["label"] == pytest.approx(np.mean([_iou(r.label, gt, k) for k in present]))
    assert f"IoU % vs ground truth for **{classes[0]}**" in views["status"] and "mIoU % over background" in views["status"]
    # every slider updates the scores
    line = [l for l in views["status"].split("\n\n") if l.startswith("IoU")][0]
    after = views_of(studio.refine(session, Controls(alpha=1, par_iterations=3), Display(classes[0]))[1:12])
    assert "IoU % vs ground truth" in after["status"] and line not in after["status"]


def test_a_mask_that_does_not_fit_is_said_and_dropped_with_its_image(studio, tmp_path):
    wrong = tmp_path / "wrong.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(wrong)
    session, views, _ = analyse(studio, gt=str(wrong))
    assert "Ground-truth mask not used: it is 10×10 but the image is 451×300" in views["status"]
    assert session.result is not None and session.gt is None
    values = tmp_path / "values.png"
    Image.fromarray(np.full((300, 451), 40, np.uint8)).save(values)
    session, views, _ = analyse(studio, gt=str(values), session=session)
    assert "values [40] are not classes of the voc vocabulary" in views["status"]
    good = tmp_path / "good.png"
    Image.fromarray(np.full((300, 451), 8, np.uint8)).save(good)
    session, views, _ = analyse(studio, gt=str(good), session=session)
    assert session.gt is not None and "IoU % vs ground truth" in views["status"]
    session, views, _ = analyse(studio, path=ASTRONAUT, classes=("person",), gt=str(good), session=session)
    assert session.gt is None and "belonged to the previous image" in views["status"]


# ---------------------------------------------------------------- decoder adaptation


def adapt(studio, session, steps, view_class="cat"):
    out = studio.adapt(session, steps, Controls(), Display(view_class))
    return out[0], views_of(out[1:12]), out[12], out[13]


def replay(studio, session, index, view_class="cat"):
    out = studio.replay(session, index, Controls(), Display(view_class))
    return out[0], views_of(out[1:12]), out[12]


def test_adapting_the_decoder_replays_its_steps_for_this_session_only(studio, models):
    import torch

    shared = {k: v.clone() for k, v in models.decoder.state_dict().items()}
    session, before, _ = analyse(studio)
    studio.inspect(session, 200, 150, Display("cat"))
    before_rows = session.rows.decoder
    session, views, slider, losses = adapt(studio, session, 10)
    a = session.adaptation
    assert [s.step for s in a.history] == list(range(11))  # before + one snapshot per step (10 ≤ 20)
    assert slider["visible"] is True and slider["maximum"] == 10 and slider["value"] == 10
    assert losses.ndim == 3 and len(a.losses) == 10
    assert "Decoder adapted to **chelsea** (10 steps" in views["status"] and "step 10/10" in views["status"]
    assert session.predictor.decoder is not models.decoder
    assert all(torch.equal(v, shared[k]) for k, v in models.decoder.state_dict().items())  # shared one untouched
    assert not np.array_equal(session.rows.decoder, before_rows)  # the inspected A_f row follows the decoder

    session, start, start_plot = replay(studio, session, 0)
    assert "replay: before adaptation" in start["status"] and a.shown == 0
    np.testing.assert_array_equal(session.rows.decoder, before_rows)
    session, end, end_plot = replay(studio, session, 10)
    np.testing.assert_array_equal(end["rfm"], views["rfm"])  # the end of the slider is the adapted state
    assert not np.array_equal(start["rfm"], end["rfm"]) and not np.array_equal(start["affinity"], end["affinity"])
    np.testing.assert_array_equal(end_plot, losses)
    assert not np.array_equal(start_plot, losses)  # the loss curve marks the step shown
    # another session, same image: the shared decoder, as this one was before adapting
    other, fresh, _ = analyse(studio, session=None)
    assert other.predictor.decoder is models.decoder and other.adaptation is None
    np.testing.assert_array_equal(fresh["rfm"], before["rfm"])
    assert "adapted" not in fresh["status"]


def test_adapting_without_a_decoder_makes_rfm_appear(models):
    studio = Studio(Models(models.clip, None), max_side=224)
    session, views, _ = analyse(studio)
    assert views["rfm"] is None and views["rfm_missing"]["visible"] is True
    session, views, slider, _ = adapt(studio, session, 5)
    assert views["rfm"] is not None and views["rfm_missing"]["visible"] is False
    assert np.isfinite(session.result.layer_scores[6:]).all() and studio.models.decoder is None
    session, start, _ = replay(studio, session, 0)
    assert start["rfm"] is None and start["rfm_missing"]["visible"] is True
    assert "no decoder, so no RFM" in start["status"]
    session, end, _ = replay(studio, session, slider["maximum"])
    np.testing.assert_array_equal(end["rfm"], views["rfm"])


def test_a_class_change_clears_the_replay_and_a_new_image_the_adaptation(models):
    studio = Studio(models, max_side=224)
    session, _, _ = analyse(studio)
    session, adapted, _, _ = adapt(studio, session, 5)
    decoder = session.predictor.decoder
    replay(studio, session, 0)  # a class change must not leave the replayed "before" A_f behind
    session, views, (_, slider, losses, *_) = analyse(studio, classes=("cat", "dog"), session=session,
                                                      view_class="cat")
    assert session.predictor.decoder is decoder and session.adaptation.history == []
    assert session.adaptation.stem == "chelsea" and slider["visible"] is False and losses is None
    assert "replay cleared by the class change" in views["status"]
    session, again, _ = analyse(studio, classes=("cat",), session=session)
    np.testing.assert_array_equal(again["rfm"], adapted["rfm"])  # the adapted A_f, not the replayed one
    session, views, _ = analyse(studio, path=ASTRONAUT, classes=("person",), session=session)
    assert session.predictor.decoder is models.decoder and session.adaptation is None
    assert "back to the shared decoder" in views["status"] and "**chelsea**" in views["status"]


def test_adapt_and_replay_need_an_image_first(studio):
    _, views, slider, _ = adapt(studio, None, 5)
    assert "Analyse an image first" in views["status"] and slider["visible"] is False
    session, views, _ = analyse(studio)
    _, views, plot = replay(studio, session, 3)
    assert "Adapt the decoder to this image first" in views["status"] and plot is None


def test_one_sessions_adaptation_lets_other_sessions_refine(models):
    """The adapting tab takes the model lock one step at a time: a refine of another tab waits for
    one step, not for the whole adaptation (it waited 18 s before)."""
    studio = Studio(models, max_side=224)
    adapting, _, _ = analyse(studio)
    other, _, _ = analyse(studio, path=ASTRONAUT, classes=("person",))
    steps_done = []
    real = adapting.predictor.adapt_decoder

    def counting(*args, callback, **kwargs):
        def cb(step, total, losses):
            steps_done.append(step)
            callback(step, total, losses)
        return real(*args, callback=cb, **kwargs)

    adapting.predictor.adapt_decoder = counting
    worker = threading.Thread(target=lambda: studio.adapt(adapting, 60, Controls(), Display("cat")))
    worker.start()
    while not steps_done:
        time.sleep(0.01)
    studio.refine(other, Controls(alpha=3), Display("person"))
    at_refine = len(steps_done)
    worker.join()
    assert other.result.params.alpha == 3 and at_refine < 40, at_refine


def test_fair_lock_serves_waiters_in_arrival_order():
    lock, order = FairLock(), []
    lock.acquire()
    threads = []
    for i in range(3):
        threads.append(threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release())))
        threads[-1].start()
        time.sleep(0.05)
    lock.yield_turn()  # the three waiting threads go first, in order
    order.append("me")
    lock.release()
    for t in threads:
        t.join()
    assert order == [0, 1, 2, "me"]


def test_loss_curve_marks_the_replayed_step():
    losses = [(s, 2.0 / s, 0.5, 2.0 / s + 0.05) for s in range(1, 11)]
    curve = viz.loss_curve(losses, current=5)
    assert curve.shape == (160, 520, 3) and curve.dtype == np.uint8
    colours = {tuple(c) for c in curve.reshape(-1, 3)}
    assert {viz.LOSS_RGB["seg"], viz.LOSS_RGB["aff"], (150, 150, 150)} <= colours
    x = round(8 + 5 / 10 * (520 - 16))
    assert (curve[40:130, x] == (150, 150, 150)).all(axis=1).sum() > 40  # the marker's vertical line
    assert viz.loss_curve([]).shape == (160, 520, 3)


# ---------------------------------------------------------------- the API, through gradio_client


@pytest.fixture(scope="module")
def server(models):
    app = build_app(Studio(models)).queue(default_concurrency_limit=4)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


DEFAULTS = Controls().values()


def client_analyse(client, path, classes, boxes=()):
    from gradio_client import handle_file

    return client.predict({"image": handle_file(str(path)), "boxes": list(boxes), "orientation": 0}, list(classes),
                          "VOC", "", VOC_BACKGROUND, None, *DEFAULTS, None, False, api_name="/analyse")


def test_api_endpoints(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    out = client_analyse(client, CHELSEA, ["cat"])
    assert Image.open(out[0]).size == (451, 300) and "Classes: cat" in out[10]
    refined = client.predict(3, 7, 8, 0.4, 1.0, 20, "abs", "cat", False, api_name="/refine")
    assert rgb(refined[1]).shape == (300, 451, 3) and not np.array_equal(rgb(refined[1]), rgb(out[1]))
    inspected = client.predict(100, 100, "cat", False, api_name="/inspect")
    assert len(inspected[7]) == 12 and inspected[7][11]["caption"].startswith("l=12 ")
    label = Image.open(client.predict(api_name="/export_label"))
    assert label.mode == "P" and label.size == (451, 300)
    assert client.predict("VOC", "", api_name="/reset") == (2, 7, 8, 0.4, 1, 20, "abs")


def test_adapt_and_replay_endpoints(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    first = client_analyse(client, CHELSEA, ["cat"])
    adapted = client.predict(5, *DEFAULTS, "cat", False, api_name="/adapt")
    assert "Decoder adapted to **chelsea** (5 steps" in adapted[10] and adapted[11]["value"] == 5
    assert Image.open(adapted[12]).size == (520, 160)
    start = client.predict(0, *DEFAULTS, "cat", False, api_name="/replay")
    assert "replay: before adaptation" in start[10]
    np.testing.assert_array_equal(rgb(start[2]), rgb(first[2]))  # RFM view with the shared decoder again
    assert not np.array_equal(rgb(start[2]), rgb(adapted[2]))


def test_two_sessions_do_not_interfere(server):
    from gradio_client import Client

    clients = [Client(server, verbose=False) for _ in range(2)]
    jobs = [(clients[0], CHELSEA, ["cat"]), (clients[1], ASTRONAUT, ["person"])]
    barrier = threading.Barrier(2)

    def run(job):
        client, path, classes = job
        barrier.wait()
        first = client_analyse(client, path, classes)
        client.predict(4, 7, 8, 0.4, 1.0, 20, "abs", classes[0], False, api_name="/refine")
        return first, Image.open(client.predict(api_name="/export_label"))

    with ThreadPoolExecutor(2) as pool:
        (cat, cat_label), (person, person_label) = pool.map(run, jobs)
    assert Image.open(cat[0]).size == (451, 300) and Image.open(person[0]).size == (512, 512)
    assert cat_label.size == (451, 300) and person_label.size == (512, 512)
    assert set(np.unique(np.asarray(cat_label))) <= {0, 8} and set(np.unique(np.asarray(person_label))) <= {0, 15}
    assert "Classes: cat" in cat[10] and "Classes: person" in person[10]


# ---------------------------------------------------------------- the app's rendering helpers in rfm.viz


def test_layer_margin_chart_is_centred_on_the_threshold():
    margins = np.array([np.nan] * 6 + [3.0, 2.0, -1.0, 2.5, -4.0, -2.5]) * 1e-6
    keep = np.isfinite(margins) & (margins < 0)
    chart = viz.layer_margin_chart(margins, keep, 7)
    colours = {tuple(c) for c in chart.reshape(-1, 3)}
    assert {viz.KEPT_RGB, viz.REJECTED_RGB, viz.INACTIVE_RGB} <= colours
    left, right, top, bottom = 58, chart.shape[1] - 8, 26, chart.shape[0] - 22
    zero = (top + bottom) // 2

    def column(layer):
        return chart[:, round(left + (layer - 0.5) * (right - left) / 12)]

    def extent(layer, rgb):  # rows of that colour down the middle of the layer's slot
        rows = np.flatnonzero((column(layer) == rgb).all(axis=1))
        return rows.min(), rows.max()

    assert extent(7, viz.REJECTED_RGB)[1] <= zero and extent(11, viz.KEPT_RGB)[0] >= zero  # up = above threshold
    assert extent(11, viz.KEPT_RGB)[1] - zero > zero - extent(7, viz.REJECTED_RGB)[0] > 0  # |−4| > |3|
    empty = viz.layer_margin_chart(np.full(12, np.nan), np.zeros(12, bool), 7)
    assert not {viz.KEPT_RGB, viz.REJECTED_RGB} & {tuple(c) for c in empty.reshape(-1, 3)}


def test_fit_keeps_labels_and_averages_maps():
    label = np.zeros((40, 60), np.uint8)
    label[:, 30:] = 15
    small = viz.fit(label, (20, 30))
    assert small.dtype == np.uint8 and set(np.unique(small)) == {0, 15}
    cam = np.zeros((40, 60), np.float32)
    cam[::2] = 1.0
    np.testing.assert_allclose(viz.fit(cam, (20, 30)), 0.5)
    assert viz.fit(cam, (40, 60)) is cam


def test_draw_boxes_scales_and_attention_tile_frames():
    image = np.zeros((50, 100, 3), np.uint8)
    boxed = viz.draw_boxes(image, [(20, 10, 80, 40)], (255, 0, 0), 1, scale=0.5)
    assert (boxed[5, 10:40] == (255, 0, 0)).all() and (boxed[5, 41:] == 0).all()
    tile = viz.attention_tile(image, np.arange(6, dtype=np.float32).reshape(2, 3), (50, 25), viz.KEPT_RGB)
    assert tuple(tile[0, 0]) == viz.KEPT_RGB and tile.shape[0] > 50
    assert not np.isnan(viz.attention_tile(image, np.ones((2, 3)) * np.nan).astype(float)).any()


# ---------------------------------------------------------------- review findings: state that must not leak


def test_a_slider_never_refines_the_previous_images_features(studio, tmp_path):
    session, _, _ = analyse(studio)
    session, views, _ = analyse(studio, path=ASTRONAUT, classes=(), session=session)  # new image, no class yet
    assert "Choose the classes" in views["status"]
    views = views_of(studio.refine(session, Controls(alpha=3), Display("cat"))[1:12])
    # the views the analyse emptied stay empty (sent as None then, skipped now); no result is made
    assert session.result is None and skipped(views["initial"]) and "choose its classes" in views["status"]
    assert session.view_cache["initial"][1] is None
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tiny)
    session, _, _ = analyse(studio, session=session)
    session, views, _ = analyse(studio, path=tiny, session=session)  # set_image fails: chelsea's features must go
    assert "patch" in views["status"]
    studio.refine(session, Controls(alpha=3), Display("cat"))
    assert session.result is None and session.predictor.features is None
    with pytest.raises(UserMessage):
        session.export_label()


def test_a_class_change_after_a_replay_shows_the_adapted_decoders_affinity(models):
    studio = Studio(models, max_side=224)
    session, _, _ = analyse(studio)
    studio.inspect(session, 200, 150, Display("cat"))
    adapt(studio, session, 5)
    adapted_row = session.rows.decoder.copy()
    replay(studio, session, 0)
    assert not np.array_equal(session.rows.decoder, adapted_row)
    analyse(studio, classes=("cat", "dog"), session=session, view_class="cat")
    np.testing.assert_array_equal(session.rows.decoder, adapted_row)


def test_a_mask_is_dropped_when_the_vocabulary_renumbers_its_classes(studio, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((300, 451), 8, np.uint8)).save(good)
    session, _, _ = analyse(studio, gt=str(good))
    assert session.gt is not None
    session, views, _ = analyse(studio, gt=str(good), session=session, kind="COCO", classes=("cat",))
    assert session.gt is None and "previous vocabulary" in views["status"]
    assert "IoU % vs ground truth" not in views["status"]


def test_only_a_plain_rgb_jpeg_keeps_its_bytes(tmp_path):
    from rfm.session import read_upload

    photo = rgb(CHELSEA)
    Image.fromarray(photo).save(tmp_path / "plain.jpg")
    Image.fromarray(photo).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert read_upload(tmp_path / "plain.jpg", 512).jpeg_bytes == (tmp_path / "plain.jpg").read_bytes()
    assert read_upload(tmp_path / "cmyk.jpg", 512).jpeg_bytes is None  # the dataset gets the RGB the pipeline saw


def test_empty_and_fractional_values_are_said_precisely():
    controls, notes = Controls(n0=None, alpha=2.5).clamped(12)
    assert controls.n0 == 7 and notes == ["α = 2.5 is not a whole number: using 2", "N0 was empty: using 7"]


def test_a_failed_render_resends_every_view_next_time(studio, monkeypatch):
    session, _, _ = analyse(studio)
    import rfm.ui as ui

    real = ui.render
    monkeypatch.setattr(ui, "render", lambda *a, **k: 1 / 0)
    out = views_of(studio.refine(session, Controls(alpha=3), Display("cat"))[1:12])
    assert "Could not draw the views" in out["status"] and skipped(out["static"])
    monkeypatch.setattr(ui, "render", real)
    out = views_of(studio.refine(session, Controls(alpha=3), Display("cat"))[1:12])
    assert not any(skipped(out[name]) for name in ("initial", "static", "rfm", "label", "chart"))


def test_a_served_studio_adds_to_datasets_only_inside_its_root(models, tmp_path):
    root = tmp_path / "datasets"
    studio = Studio(models, dataset_root=root)
    session, _, _ = analyse(studio)
    for outside in ("../elsewhere", str(tmp_path / "elsewhere"), "mine/../../elsewhere"):
        _, status = studio.add_to_dataset(session, outside, "", False)
        assert "Not saved" in status and "served to other machines" in status, outside
    assert not (tmp_path / "elsewhere").exists()
    _, status = studio.add_to_dataset(session, "mine", "", False)
    assert "1 labelled image" in status and (root / "mine" / "SegmentationClass" / "chelsea.png").is_file()


def test_closing_a_tab_frees_its_session_and_files(models):
    studio = Studio(models)
    tab = types.SimpleNamespace(session_hash="tab-1")
    session = studio.open_tab(tab)
    assert studio.open_tabs == 1
    session, _, _ = analyse(studio, session=session)
    _, label_path = studio.export_label(session)
    folder = Path(label_path).parent
    assert folder.name.startswith("rfm-studio-") and folder.is_dir()
    studio.close_tab(tab)
    assert studio.open_tabs == 0 and not folder.exists()
    assert session.result is None and session.predictor.features is None  # the CLIP features are gone
    studio.close_tab(tab)  # a second unload (a reload racing the close) is harmless


def test_the_app_frees_tabs_on_unload_and_deletes_old_uploads(models):
    studio = Studio(models)
    app = build_app(studio)
    events = {(fn.fn.__name__, tuple(t[1] for t in fn.targets)) for fn in app.fns.values()
              if getattr(fn.fn, "__name__", "") in ("open_tab", "close_tab")}
    assert events == {("open_tab", ("load",)), ("close_tab", ("unload",))}
    assert app.delete_cache == (3600, 86400)


def test_sweeping_an_image_scores_its_grid_and_a_click_sets_the_sliders(models):
    from rfm import viz
    from rfm.session import sweep_axes

    studio = Studio(models)
    session, _, _ = analyse(studio, classes=("cat",))
    _, image, caption = studio.sweep(session, "label", Controls())
    assert image is None and "ground-truth mask" in caption  # nothing to score against yet
    gt = np.zeros((300, 451), np.uint8)
    gt[60:260, 100:380] = rfm.text.get_vocabulary("voc").index("cat") + 1
    Image.fromarray(gt).save(mask_path := Path(session.folder) / "gt.png")
    session, _, _ = analyse(studio, classes=("cat",), session=session, gt=str(mask_path))
    controls = Controls(par_iterations=2)
    _, image, caption = studio.sweep(session, "label", controls)
    n0s, alphas = sweep_axes(models.num_blocks)
    sweep = session.current_sweep
    assert sweep.miou["label"].shape == (len(n0s), len(alphas)) and image.ndim == 3
    # each cell is the live score the status shows once the sliders are there (computed independently)
    for (i, n0), (j, alpha) in [((0, n0s[0]), (0, alphas[0])), ((len(n0s) - 1, n0s[-1]), (1, alphas[1]))]:
        studio.refine(session, Controls(alpha=alpha, n0=n0, par_iterations=2), Display("cat"))
        assert sweep.miou["label"][i, j] == pytest.approx(session.scores("cat").miou["label"])
        assert sweep.miou["rfm"][i, j] == pytest.approx(session.scores("cat").miou["rfm"])
    best = sweep.best("static")
    assert caption.startswith("Best label:") and "Click a cell" in caption
    # a click in the middle of cell (row 1, column 2) sets N0 and α to it and refines
    (cw, ch), (left, top) = viz.SWEEP_CELL, viz.SWEEP_MARGIN
    out = studio.pick_sweep_cell(session, controls, Display("cat"), left + 2.5 * cw, top + 1.5 * ch)
    assert out[-7:-5] == (alphas[2], n0s[1]) and session.controls.alpha == alphas[2] and session.controls.n0 == n0s[1]
    assert session.result.params.n0 == n0s[1]
    outside = studio.pick_sweep_cell(session, controls, Display("cat"), 1, 1)
    assert all(skipped(v) for v in outside[1:])  # a click on the labels changes nothing
    assert studio.sweep_stage(session, "static")[1].startswith("Best static") and best is not None
