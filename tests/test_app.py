"""The web app without a browser: its handlers called directly, its API through gradio_client, and two
clients at once. Demo models (small random CLIP + random decoder) stand in for real weights."""
import json
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rfm
import rfm.pipeline
from rfm import viz
from rfm.ui import DISPLAY_SIDE, Models, Session, Studio, Views, build_app, sample_paths
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
CHELSEA = ROOT / "assets" / "chelsea.png"  # 451×300, a cat
ASTRONAUT = ROOT / "assets" / "astronaut.png"  # 512×512, a person
DEFAULTS = (2, 7, 8, 0.4, 1.0, 20, "abs")
VOC_BACKGROUND = ", ".join(rfm.text.get_vocabulary("voc").background)


@pytest.fixture(scope="module")
def models():
    return Models.from_demo("cpu")


@pytest.fixture
def studio(models):
    return Studio(models)


def analyse(studio, path=CHELSEA, classes=("cat",), boxes=(), session=None, controls=DEFAULTS, view_class=None,
            show_auto=False, kind="VOC", custom=""):
    out = studio.analyse(session, {"image": str(path), "boxes": list(boxes)}, list(classes), kind, custom,
                         VOC_BACKGROUND, *controls, view_class, show_auto)
    return out[0], Views(*out[1:11]), out[11]


def views_of(out):
    return out[0], Views(*out[1:])


def rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------- handlers


def test_analyse_draws_every_view_at_the_image_size(studio):
    session, views, view_class = analyse(studio)
    image = rgb(CHELSEA)
    for view in (views.initial, views.static, views.rfm, views.label):
        assert view.shape == image.shape and view.dtype == np.uint8
    r = session.result
    np.testing.assert_array_equal(views.initial, viz.overlay_cam(image, r.cam_initial[0]))
    np.testing.assert_array_equal(views.label, viz.overlay_label(image, r.label))
    assert views.rfm_note["visible"] is False
    assert "random weights — heatmaps are meaningless" in views.status
    assert "rgb(64, 0, 0)" in views.legend and "cat" in views.legend  # VOC colour of cat (label 8)
    assert views.chart.ndim == 3 and views.layers == [] and views.affinity is None
    assert view_class["choices"] == ["cat"] and view_class["value"] == "cat"


def test_slider_change_refines_without_the_clip_forward(studio, monkeypatch):
    session, before, _ = analyse(studio)

    def forbidden(*args, **kwargs):
        raise AssertionError("a slider change must not rerun CLIP")

    monkeypatch.setattr(rfm.pipeline, "forward_blocks", forbidden)
    monkeypatch.setattr(rfm.pipeline, "initial_cam", forbidden)
    session, after = views_of(studio.refine(session, 3, 7, 8, 0.4, 1.0, 20, "abs", "cat", False))
    assert session.result.params.alpha == 3
    assert not np.array_equal(before.static, after.static)
    np.testing.assert_array_equal(before.initial, after.initial)  # stage 2 does not depend on α
    session, n0_changed = views_of(studio.refine(session, 3, 10, 8, 0.4, 1.0, 20, "abs", "cat", False))
    assert np.isnan(session.result.layer_scores[:9]).all() and np.isfinite(session.result.layer_scores[9:]).all()
    assert not np.array_equal(after.rfm, n0_changed.rfm)  # the demo CLIP keeps layers 9, 11 from N0=7, 11 from 10


def test_class_change_reuses_the_backbone(studio, monkeypatch):
    session, _, _ = analyse(studio)
    calls = []
    monkeypatch.setattr(session.predictor, "set_image", lambda *a, **k: calls.append("set_image"))
    original = session.predictor.set_labels
    monkeypatch.setattr(session.predictor, "set_labels", lambda labels: (calls.append("set_labels"), original(labels)))
    session, views, view_class = analyse(studio, classes=("cat", "dog"), session=session, view_class="cat")
    assert calls == ["set_labels"]
    assert session.result.class_names == ["cat", "dog"] and view_class["value"] == "cat"
    session, views = views_of(studio.render(session, "dog", False))
    np.testing.assert_array_equal(views.static, viz.overlay_cam(rgb(CHELSEA), session.result.cam_static[1]))


def test_a_user_box_confines_its_class(studio):
    box = {"label": "cat", "xmin": 100, "ymin": 60, "xmax": 260, "ymax": 200, "color": (255, 0, 0)}
    session, views, _ = analyse(studio, boxes=[box])
    assert session.boxes == {"cat": [(100.0, 60.0, 260.0, 200.0)]}
    r = session.result
    outside = np.ones(r.image_size, bool)
    outside[60:200, 100:260] = False
    assert r.cam_static[0][outside].max() == 0 and r.cam_rfm[0][outside].max() == 0
    assert not (r.label[outside] == 8).any() and (r.label[~outside] == 8).any()
    blank = viz.overlay_cam(rgb(CHELSEA), np.zeros(r.image_size, np.float32))
    inner = np.zeros(r.image_size, bool)
    inner[70:190, 110:250] = True  # the box outline itself is drawn in the class colour
    far = outside.copy()
    far[50:210, 90:270] = False
    np.testing.assert_array_equal(views.static[far], blank[far])
    assert not np.array_equal(views.static[inner], blank[inner])


def test_boxes_are_clamped_and_unlabelled_ones_wait_for_a_label(studio):
    boxes = [{"label": "cat", "xmin": -20, "ymin": 10, "xmax": 9999, "ymax": 100},
             {"label": "", "xmin": 5, "ymin": 5, "xmax": 50, "ymax": 50}]
    session, _, _ = analyse(studio, boxes=boxes)
    assert session.boxes == {"cat": [(0.0, 10.0, 451.0, 100.0)]}
    assert session.result is not None


def test_a_rotated_annotator_view_is_refused(studio):
    out = studio.analyse(None, {"image": str(CHELSEA), "boxes": [], "orientation": 1}, ["cat"], "VOC", "",
                         VOC_BACKGROUND, *DEFAULTS, None, False)
    assert "not supported" in out[10] and out[0].result is None


def test_automatic_boxes_toggle_draws_them(studio):
    session, plain, _ = analyse(studio)
    session, boxed = views_of(studio.render(session, "cat", True))
    expected = viz.draw_boxes(plain.static, session.result.auto_boxes["cat"], (255, 255, 255), 2)
    np.testing.assert_array_equal(boxed.static, expected)
    assert not np.array_equal(boxed.static, plain.static)


def test_inspecting_a_pixel_fills_the_layer_gallery(studio):
    session, _, _ = analyse(studio)
    session, views = views_of(studio.inspect(session, 200, 150, "cat", False))
    r = session.result
    assert len(views.layers) == session.predictor.num_blocks == 12
    for l, (tile, caption) in enumerate(views.layers, start=1):
        assert tile.ndim == 3 and caption.startswith(f"l={l} ")
        if l < 7:
            assert "not a candidate" in caption
        else:
            assert f"S={r.layer_scores[l - 1]:.5g}" in caption
            assert caption.endswith("kept" if r.layer_keep[l - 1] else "rejected")
    assert views.affinity is not None
    rows = session.predictor.attention_rows(200, 150)
    small = viz.thumbnail(rgb(CHELSEA), 192)
    point = (200 * small.shape[1] / 451, 150 * small.shape[0] / 300)
    expected = viz.attention_tile(small, rows.layers[0], point, viz.INACTIVE_RGB)
    np.testing.assert_array_equal(views.layers[0][0], expected)
    # the gallery follows later refinements (N0 changes which layers are candidates)
    session, views = views_of(studio.refine(session, 2, 3, 8, 0.4, 1.0, 20, "abs", "cat", False))
    assert "not a candidate" not in views.layers[2][1] and "not a candidate" in views.layers[1][1]


def test_inspecting_outside_the_image_is_a_message(studio):
    session, _, _ = analyse(studio)
    session, views = views_of(studio.inspect(session, 5000, 10, "cat", False))
    assert "outside" in views.status and session.pixel is None


def test_large_image_is_shown_small_but_exported_full_size(studio, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).save(big)
    session, views, _ = analyse(studio, path=big)
    assert max(views.initial.shape[:2]) == DISPLAY_SIDE
    assert session.result.image_size == (1200, 1600)
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
    assert doc["images"][0]["height"] == 300 and doc["images"][0]["width"] == 451
    for ann in doc["annotations"]:
        rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
        np.testing.assert_array_equal(mask_utils.decode(rle), r.label == ann["category_id"])

    _, figure_path = studio.export_figure(session)
    assert Image.open(figure_path).format == "PNG"


def test_coco_vocabulary_exports_coco_category_ids(studio):
    session, _, _ = analyse(studio, classes=("cat",), kind="COCO")
    _, coco_path = studio.export_coco(session)
    doc = json.loads(Path(coco_path).read_text())
    assert doc["categories"] == [{"id": 17, "name": "cat"}]  # COCO's id for cat, not index + 1 = 16


def test_exports_without_a_result_warn(studio):
    assert studio.export_label(None) == (None, None)
    session = Session()
    assert studio.export_cams(session) == (session, None)


def test_add_to_dataset_never_overwrites_silently(studio, tmp_path):
    session, _, _ = analyse(studio)
    root = tmp_path / "dataset"
    _, status = studio.add_to_dataset(session, str(root), "", False)
    assert "1 labelled image" in status and "1 added in this session" in status
    label_file = root / "SegmentationClass" / "chelsea.png"
    assert Image.open(label_file).mode == "P" and (root / "JPEGImages" / "chelsea.png").is_file()
    before = label_file.read_bytes()
    session, _ = views_of(studio.refine(session, 4, 7, 8, 0.4, 1.0, 0, "abs", "cat", False))
    _, status = studio.add_to_dataset(session, str(root), "chelsea", False)
    assert "Not saved" in status and label_file.read_bytes() == before
    _, status = studio.add_to_dataset(session, str(root), "chelsea", True)
    assert "1 labelled image" in status and label_file.read_bytes() != before
    _, status = studio.add_to_dataset(session, str(root), "copy", False)
    assert "2 labelled image" in status and "3 added in this session" in status


def test_bad_parameters_are_reported_not_raised(studio):
    session, _, _ = analyse(studio)
    session, views = views_of(studio.refine(session, 2, 13, 8, 0.4, 1.0, 20, "abs", "cat", False))
    assert "n0=13" in views.status
    session, views, _ = analyse(studio, classes=(), session=session)
    assert "Choose the classes" in views.status and views.initial is None
    session, views, _ = analyse(studio, kind="custom", custom=" , ")
    assert "at least one class word" in views.status


def test_unreadable_image_is_a_message(studio, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    session, views, _ = analyse(studio, path=broken)
    assert views.status.count("⚠️") == 1 and session.result is None


def test_vocabulary_and_class_choices(studio):
    classes, background, custom = studio.choose_vocabulary("COCO", "", ["cat", "aeroplane"])
    assert len(classes["choices"]) == 80 and classes["value"] == ["cat"]
    assert background == ", ".join(rfm.text.get_vocabulary("coco").background) and custom["visible"] is False
    classes, _, custom = studio.choose_vocabulary("custom", "lamp, mug", [])
    assert classes["choices"] == ["lamp", "mug"] and custom["visible"] is True
    annotator, view_class = studio.choose_classes("VOC", "", ["cat", "dog"], "dog")
    assert annotator["label_list"] == ["cat", "dog"]
    assert annotator["label_colors"] == ["#400000", "#400080"]  # VOC palette 8 (cat), 12 (dog)
    assert view_class["value"] == "dog"


def test_custom_vocabulary_and_background_words(studio):
    out = studio.analyse(None, {"image": str(CHELSEA), "boxes": []}, ["kitten"], "custom", "kitten, sofa",
                         "floor, wall", *DEFAULTS, None, False)
    session = out[0]
    assert session.predictor.vocabulary.class_names == ("kitten", "sofa")
    assert session.predictor.vocabulary.background == ("floor", "wall")
    assert session.result.class_names == ["kitten"]


def test_samples_suggest_their_classes(studio):
    index = [p.stem for p in sample_paths()].index("chelsea")
    value, classes = studio.pick_sample("VOC", "", types.SimpleNamespace(index=index))
    assert value == {"image": str(CHELSEA), "boxes": []} and classes["value"] == ["cat"]
    index = [p.stem for p in sample_paths()].index("coffee")
    _, classes = studio.pick_sample("COCO", "", types.SimpleNamespace(index=index))
    assert classes["value"] == ["cup", "spoon", "dining table"]


def test_reset_restores_the_paper_defaults(studio):
    assert studio.reset_controls() == DEFAULTS


def test_without_decoder_the_rfm_view_explains(models):
    studio = Studio(Models(models.clip, None))
    session, views, _ = analyse(studio)
    assert views.rfm is None and views.rfm_note["visible"] is True
    assert session.result.cam_rfm is None and "demo" not in views.status.lower()
    _, cams_path = studio.export_cams(session)
    np.testing.assert_allclose(np.load(cams_path, allow_pickle=True).item()["attn_highres"],
                               session.result.cam_static, atol=1e-3)


def test_missing_weights_banner_then_demo_mode(tmp_path):
    models = Models.load(clip=str(tmp_path / "ViT-B-16.pt"), device="cpu")
    assert models.clip is None and str(tmp_path / "ViT-B-16.pt") in models.error
    studio = Studio(models)
    demo_banner, weights_banner, message = studio.banners()
    assert demo_banner["visible"] is False and weights_banner["visible"] is True
    assert str(tmp_path / "ViT-B-16.pt") in message
    session, views, _ = analyse(studio)
    assert "No CLIP weights" in views.status and session.result is None
    demo_banner, weights_banner, _ = studio.enable_demo()
    assert demo_banner["visible"] is True and weights_banner["visible"] is False
    session, views, _ = analyse(studio, session=session)
    assert session.result is not None and "heatmaps are meaningless" in views.status


def test_command_line_defaults():
    sys.path.insert(0, str(ROOT))
    import app

    args = app.build_parser().parse_args([])
    assert (args.host, args.port, args.share, args.demo, args.max_side, args.clip) == (
        "127.0.0.1", 7860, False, False, 512, "auto")


# ---------------------------------------------------------------- decoder adaptation


def adapt(studio, session, steps, view_class="cat"):
    out = studio.adapt(session, steps, *DEFAULTS, view_class, False)
    return out[0], Views(*out[1:11]), out[11], out[12]


def replay(studio, session, index, view_class="cat"):
    out = studio.replay(session, index, *DEFAULTS, view_class, False)
    return out[0], Views(*out[1:11]), out[11]


def test_adapting_the_decoder_replays_its_steps_for_this_session_only(studio, models):
    import torch

    shared = {k: v.clone() for k, v in models.decoder.state_dict().items()}
    session, before, _ = analyse(studio)
    session, _ = views_of(studio.inspect(session, 200, 150, "cat", False))
    before_rows = session.rows.decoder
    session, views, slider, losses = adapt(studio, session, 10)
    assert [s.step for s in session.history] == list(range(11))  # before + one snapshot per step (10 ≤ 20)
    assert slider["visible"] is True and slider["maximum"] == 10 and slider["value"] == 10
    assert losses.ndim == 3 and len(session.losses) == 10
    assert "Decoder adapted to **chelsea** (10 steps" in views.status and "step 10/10" in views.status
    assert session.predictor.decoder is not models.decoder
    assert all(torch.equal(v, shared[k]) for k, v in models.decoder.state_dict().items())  # shared one untouched
    assert not np.array_equal(session.rows.decoder, before_rows)  # the inspected A_f row follows the decoder

    session, start, start_plot = replay(studio, session, 0)
    assert "replay: before adaptation" in start.status and session.shown == 0
    np.testing.assert_array_equal(session.rows.decoder, before_rows)
    session, end, end_plot = replay(studio, session, 10)
    np.testing.assert_array_equal(end.rfm, views.rfm)  # the end of the slider is the adapted state
    assert not np.array_equal(start.rfm, end.rfm) and not np.array_equal(start.affinity, end.affinity)
    np.testing.assert_array_equal(end_plot, losses)
    assert not np.array_equal(start_plot, losses)  # the loss curve marks the step shown
    # another session, same image: the shared decoder, as this one was before adapting
    other, fresh, _ = analyse(studio, session=None)
    assert other.predictor.decoder is models.decoder and other.history == []
    np.testing.assert_array_equal(fresh.rfm, before.rfm)
    assert "adapted" not in fresh.status


def test_adapting_without_a_decoder_makes_rfm_appear(models):
    studio = Studio(Models(models.clip, None), max_side=224)
    session, views, _ = analyse(studio)
    assert views.rfm is None and views.rfm_note["visible"] is True
    session, views, slider, _ = adapt(studio, session, 5)
    assert views.rfm is not None and views.rfm_note["visible"] is False
    assert np.isfinite(session.result.layer_scores[6:]).all() and studio.models.decoder is None
    session, start, _ = replay(studio, session, 0)
    assert start.rfm is None and start.rfm_note["visible"] is True and "no decoder, so no RFM" in start.status
    session, end, _ = replay(studio, session, slider["maximum"])
    np.testing.assert_array_equal(end.rfm, views.rfm)


def test_a_class_change_clears_the_replay_and_a_new_image_the_adaptation(models):
    studio = Studio(models, max_side=224)
    session, _, _ = analyse(studio)
    session, adapted, _, _ = adapt(studio, session, 5)
    decoder = session.predictor.decoder
    session, _, _ = replay(studio, session, 0)  # a class change must not leave the replayed "before" A_f behind
    out = studio.analyse(session, {"image": str(CHELSEA), "boxes": []}, ["cat", "dog"], "VOC", "", VOC_BACKGROUND,
                         *DEFAULTS, "cat", False)
    views, slider, losses = Views(*out[1:11]), out[12], out[13]
    assert session.predictor.decoder is decoder and session.history == [] and session.adapted == "chelsea"
    assert slider["visible"] is False and losses is None
    assert "replay cleared by the class change" in views.status
    session, views = views_of(studio.refine(session, *DEFAULTS, "cat", False))
    session, again, _ = analyse(studio, classes=("cat",), session=session)
    np.testing.assert_array_equal(again.rfm, adapted.rfm)  # the adapted A_f, not the replayed one
    session, views, _ = analyse(studio, path=ASTRONAUT, classes=("person",), session=session)
    assert session.predictor.decoder is models.decoder and session.adapted is None
    assert "back to the shared decoder" in views.status and "**chelsea**" in views.status


def test_adapt_and_replay_need_an_image_first(studio):
    _, views, slider, _ = adapt(studio, None, 5)
    assert "Analyse an image first" in views.status and slider["visible"] is False
    session, views, _ = analyse(studio)
    _, views, plot = replay(studio, session, 3)
    assert "Adapt the decoder to this image first" in views.status and views.rfm is not None
    assert plot is None


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


def client_analyse(client, path, classes, boxes=()):
    from gradio_client import handle_file

    return client.predict({"image": handle_file(str(path)), "boxes": list(boxes), "orientation": 0}, list(classes),
                          "VOC", "", VOC_BACKGROUND, *DEFAULTS, None, False, api_name="/analyse")


def test_api_endpoints(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    out = client_analyse(client, CHELSEA, ["cat"])
    assert Image.open(out[0]).size == (451, 300) and "Classes: cat" in out[9]
    refined = client.predict(3, 7, 8, 0.4, 1.0, 20, "abs", "cat", False, api_name="/refine")
    assert rgb(refined[1]).shape == (300, 451, 3) and not np.array_equal(rgb(refined[1]), rgb(out[1]))
    inspected = client.predict(100, 100, "cat", False, api_name="/inspect")
    assert len(inspected[7]) == 12 and inspected[7][11]["caption"].startswith("l=12 ")
    label = Image.open(client.predict(api_name="/export_label"))
    assert label.mode == "P" and label.size == (451, 300)
    assert client.predict(api_name="/reset") == (2, 7, 8, 0.4, 1, 20, "abs")


def test_adapt_and_replay_endpoints(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    first = client_analyse(client, CHELSEA, ["cat"])
    adapted = client.predict(5, *DEFAULTS, "cat", False, api_name="/adapt")
    assert "Decoder adapted to **chelsea** (5 steps" in adapted[9] and adapted[10]["value"] == 5  # slider at its end
    assert Image.open(adapted[11]).size == (520, 160)
    start = client.predict(0, *DEFAULTS, "cat", False, api_name="/replay")
    assert "replay: before adaptation" in start[9]
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
    assert "Classes: cat" in cat[9] and "Classes: person" in person[9]


# ---------------------------------------------------------------- the app's rendering helpers in rfm.viz


def test_layer_score_chart_colours_kept_rejected_and_inactive_layers():
    scores = np.array([np.nan] * 6 + [3.0, 2.0, 1.0, 2.5, 0.5, 1.5])
    keep = np.isfinite(scores) & (scores < 1.75)
    chart = viz.layer_score_chart(scores, keep, 1.75)
    colours = {tuple(c) for c in chart.reshape(-1, 3)}
    assert {viz.KEPT_RGB, viz.REJECTED_RGB, viz.INACTIVE_RGB} <= colours

    def bar_height(layer, rgb):  # pixels of that colour down the middle of the layer's slot
        column = chart[:, round(8 + (layer - 0.5) * (chart.shape[1] - 16) / 12)]
        return int((column == rgb).all(axis=1).sum())

    assert bar_height(7, viz.REJECTED_RGB) > bar_height(11, viz.KEPT_RGB) > 0  # highest score vs lowest
    empty = viz.layer_score_chart(np.full(12, np.nan), np.zeros(12, bool), float("nan"))
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
