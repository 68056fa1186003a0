"""The web app in a real browser: Playwright drives headless Debian Chromium against ``app.py --demo``
started on a free localhost port. A full-page screenshot is kept under tests/artifacts/."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rfm import viz
from rfm.session import sample_classes, sample_paths
from conftest import TIMEOUT_MS, Servers, fetch_rgb, set_slider, src, wait_new_src

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHELSEA = ROOT / "assets" / "chelsea.png"  # 451×300, a cat
@pytest.fixture
def app_url(servers):
    return servers.get(["--demo"])


@pytest.fixture
def builtin_url(servers):
    return servers.get(["--clip", "synthetic"])


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1600, "height": 1200}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app_url)
    page.wait_for_selector("#samples img")
    yield page
    context.close()


def pick_chelsea(page):
    index = [p.stem for p in sample_paths()].index("chelsea")
    page.locator("#samples img").nth(index).click()
    wait_new_src(page, "view-label", None)
    page.wait_for_function("document.querySelector('#status').innerText.includes('Classes: cat')")


def test_explore_views_layers_and_download(page):
    assert "random weights — heatmaps are meaningless" in page.locator("#demo-banner").inner_text()
    pick_chelsea(page)
    assert "cat" in page.locator("#classes").inner_text()

    # choose a second class through the dropdown
    page.locator("#classes input").click()
    page.locator("#classes input").fill("dog")
    page.get_by_role("option", name="dog", exact=True).click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Classes: cat, dog')")

    static, rfm_view = src(page, "view-static"), src(page, "view-rfm")
    set_slider(page, "alpha", 3)
    static = wait_new_src(page, "view-static", static)
    rfm_view = wait_new_src(page, "view-rfm", rfm_view)
    set_slider(page, "n0", 10)  # the demo CLIP keeps layers 9 and 11 from N0 = 7, only 11 from N0 = 10
    wait_new_src(page, "view-rfm", rfm_view)
    assert src(page, "view-static") == static  # N0 is RFM's knob only

    page.locator("#view-initial img").click(position={"x": 120, "y": 90})
    page.wait_for_function("document.querySelectorAll('#layers img').length === 12")
    captions = page.locator("#layers").inner_text()
    assert "l=1 · not a candidate (l < N0 = 10)" in captions and "l=11 · " in captions and "ΔS/pair" in captions
    assert "kept" in captions and page.locator("#affinity img").count() == 1
    assert int(page.locator("#pixel-x input").input_value()) > 0

    page.locator("#export-label").click()
    link = page.locator("#download a").first
    link.wait_for()
    with page.expect_download() as download:
        link.click()
    label = Image.open(download.value.path())
    assert label.mode == "P" and label.size == (451, 300)
    assert set(np.unique(np.asarray(label))) <= {0, 8, 12}

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app_full_page.png"), full_page=True)


def test_a_drawn_box_confines_its_class(page):
    pick_chelsea(page)
    static = src(page, "view-static")
    canvas = page.locator("#annotator canvas").first.bounding_box()
    # drag over 20–50 % of the width and 20–60 % of the height (the 3:2 photo fills the canvas)
    page.mouse.move(canvas["x"] + 0.2 * canvas["width"], canvas["y"] + 0.2 * canvas["height"])
    page.mouse.down()
    page.mouse.move(canvas["x"] + 0.5 * canvas["width"], canvas["y"] + 0.6 * canvas["height"], steps=8)
    page.mouse.up()
    dialog = page.locator("#model-box-edit")
    dialog.locator("input[aria-label=Label]").click()
    page.get_by_role("option", name="cat", exact=True).click()
    dialog.get_by_role("button", name="OK").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Your boxes: cat ×1')")
    static = wait_new_src(page, "view-static", static)

    view = fetch_rgb(page, static).astype(int)
    blank = viz.overlay_cam(np.asarray(Image.open(CHELSEA).convert("RGB")), np.zeros((300, 451), np.float32))
    x0, y0, x1, y1 = 0.2 * 451, 0.2 * 300, 0.5 * 451, 0.6 * 300
    margin = 20  # the drag's rounding, the box outline and JPEG ringing
    yy, xx = np.mgrid[:300, :451]
    outside = (xx < x0 - margin) | (xx > x1 + margin) | (yy < y0 - margin) | (yy > y1 + margin)
    inside = (xx > x0 + margin) & (xx < x1 - margin) & (yy > y0 + margin) & (yy < y1 - margin)
    assert np.abs(view - blank)[outside].mean() < 3  # CAM 0 everywhere outside the box
    assert np.abs(view - blank)[inside].mean() > 20

    page.locator("#export-label").click()
    href = page.locator("#download a").first.get_attribute("href")
    label = np.asarray(Image.open(io.BytesIO(page.request.get(href).body())))
    assert (label[~outside] == 8).any() and not (label[outside] == 8).any()


def test_without_weights_the_app_starts_and_offers_demo_mode(browser, tmp_path):
    missing = tmp_path / "ViT-B-16.pt"
    server = Servers(tmp_path)  # beside the module's demo server: this one's demo mode is switched on live
    context = browser.new_context(viewport={"width": 1600, "height": 1200})
    try:
        url = server.get(["--clip", str(missing)])
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        banner = page.locator("#weights-banner")
        banner.get_by_text(str(missing)).wait_for()
        assert not page.locator("#demo-banner").is_visible()
        page.locator("#demo-button").click()
        page.locator("#demo-banner").get_by_text("random weights — heatmaps are meaningless").wait_for()
        assert not banner.is_visible()
        pick_chelsea(page)
        assert page.locator("#view-rfm img").count() == 1
    finally:
        context.close()
        server.stop()


def test_adapt_the_decoder_and_replay_its_steps(page):
    pick_chelsea(page)
    assert not page.locator("#replay").is_visible()  # nothing to replay before an adaptation
    page.locator("#view-initial img").click(position={"x": 120, "y": 90})  # the layer views follow the replay
    page.wait_for_function("document.querySelectorAll('#layers img').length === 12")
    set_slider(page, "adapt-steps", 10)
    page.locator("#adapt").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Decoder adapted to chelsea')")
    page.locator("#replay").wait_for(state="visible")
    page.locator("#adapt-losses img").wait_for()
    assert "step 10/10" in page.locator("#status").inner_text()
    adapted, affinity = src(page, "view-rfm"), src(page, "affinity")

    set_slider(page, "replay", 0)
    page.wait_for_function("document.querySelector('#status').innerText.includes('replay: before adaptation')")
    before = wait_new_src(page, "view-rfm", adapted)
    wait_new_src(page, "affinity", affinity)  # the A_f row of the clicked pixel, as the shared decoder had it
    set_slider(page, "replay", 5)
    page.wait_for_function("document.querySelector('#status').innerText.includes('replay: step 5/10')")
    middle = wait_new_src(page, "view-rfm", before)
    # the shared demo decoder's A_f against the adapted one: the RFM CAM itself changed, not only the URL
    assert np.abs(fetch_rgb(page, before).astype(int) - fetch_rgb(page, adapted)).mean() > 1
    assert fetch_rgb(page, middle).shape == (300, 451, 3)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator("#adaptation").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "app_adaptation.png"), full_page=True)


def test_builtin_model_opens_on_generated_scenes_and_shows_every_stage(browser, builtin_url):
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(builtin_url)
    page.wait_for_selector("#samples img")
    assert "real photographs mean little" in page.locator("#builtin-banner").inner_text()
    assert page.locator("#vocabulary input[value=Synthetic]").is_checked()
    first = sample_paths()[0]
    classes = sample_classes(first)
    page.locator("#samples img").first.click()
    for view in ("view-initial", "view-static", "view-rfm", "view-label"):
        wait_new_src(page, view, None)
    page.wait_for_function("(c) => document.querySelector('#status').innerText.includes('Classes: ' + c)",
                           arg=", ".join(classes))
    assert "RFM kept layers" in page.locator("#status").inner_text()  # the built-in decoder is loaded
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "builtin-model-1366x768.png"), full_page=True)
    context.close()
