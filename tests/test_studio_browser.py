"""The studio in a real browser, past the happy path: bad and unusual uploads, the custom vocabulary,
the layout on laptop and desktop screens, typed slider values, the layer gallery, live IoU against a
generated scene's mask, and two tabs sharing one server. Playwright drives headless Debian Chromium
against ``app.py`` on a free localhost port; one app server runs at a time."""
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rfm.session import sample_paths
from conftest import TIMEOUT_MS, fetch_rgb, set_slider, src, wait_new_src

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHELSEA = ROOT / "assets" / "chelsea.png"  # 451×300, a cat
VIEWS = ("view-initial", "view-static", "view-rfm", "view-label")
# Gradio 6 marks an output whose handler raised with a red <span class="error">Error</span> in its status
# tracker, and shows error toasts as .toast-body.error
ERROR_BADGE = "span.error, .toast-body.error"


@pytest.fixture
def demo_url(servers):
    return servers.get(["--demo"])


def open_page(browser, url: str, width: int = 1600, height: int = 1200):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#samples img")
    return page


@pytest.fixture
def page(browser, demo_url):
    page = open_page(browser, demo_url)
    yield page
    page.context.close()


# ---------------------------------------------------------------- helpers


def status(page) -> str:
    return page.locator("#status").inner_text()


def wait_status(page, *texts: str, absent: str | None = None) -> str:
    page.wait_for_function("([texts, absent]) => { const s = document.querySelector('#status').innerText;"
                           " return texts.every(t => s.includes(t)) && !(absent && s.includes(absent)); }",
                           arg=[list(texts), absent])
    return status(page)


def assert_no_error_badge(page, servers) -> None:
    assert page.locator(ERROR_BADGE).count() == 0, f"Gradio error badge shown; server log:\n{servers.tail()}"


def wait_status_or_badge(page, servers, *texts: str) -> None:
    """Until the status shows one of ``texts`` or an error badge appears (a handler failed); then no badge."""
    page.wait_for_function("([texts, badge]) => texts.some(t => document.querySelector('#status').innerText"
                           ".includes(t)) || document.querySelector(badge) !== null", arg=[list(texts), ERROR_BADGE])
    page.wait_for_timeout(300)  # a late error badge of the same event
    assert_no_error_badge(page, servers)


def pick_chelsea(page, absent: str | None = None):
    old = {view: src(page, view) for view in VIEWS}
    page.locator("#samples img").nth([p.stem for p in sample_paths()].index("chelsea")).click()
    for view in VIEWS:
        wait_new_src(page, view, old[view])
    wait_status(page, "Classes: cat", absent=absent)


def choose_class(page, name: str) -> None:
    page.locator("#classes input").click()
    page.locator("#classes input").fill(name)
    page.get_by_role("option", name=name, exact=True).click()


def box(page, selector: str) -> dict:
    b = page.locator(selector).bounding_box()
    assert b is not None, f"{selector} is not rendered"
    return b


def inside(b: dict, width: float, height: float, x0: float = 0, y0: float = 0, slack: float = 0.5) -> bool:
    return (b["x"] >= x0 - slack and b["y"] >= y0 - slack and b["x"] + b["width"] <= x0 + width + slack
            and b["y"] + b["height"] <= y0 + height + slack)


# ---------------------------------------------------------------- 1. bad and unusual uploads


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def make_upload(case: str, folder: Path) -> Path:
    chelsea = Image.open(CHELSEA).convert("RGB")
    if case == "unreadable":
        path = folder / "notes.jpg"
        path.write_bytes(b"these are my holiday notes, not a photograph\n" * 20)
    elif case == "truncated":
        path = folder / "cut.jpg"
        data = _jpeg_bytes(chelsea)
        path.write_bytes(data[: len(data) // 2])
    elif case == "empty":
        path = folder / "empty.png"
        path.write_bytes(b"")
    elif case == "16-bit":
        path = folder / "grey16.png"
        ramp = np.linspace(30000, 60000, 320).astype(np.uint16)
        Image.fromarray(np.tile(ramp, (240, 1))).save(path)
        assert Image.open(path).mode == "I;16"
    elif case == "cmyk":
        path = folder / "cmyk.jpg"
        chelsea.convert("CMYK").save(path, quality=90)
    elif case == "palette":
        path = folder / "palette.png"
        chelsea.convert("P", palette=Image.Palette.ADAPTIVE).save(path)
        assert Image.open(path).mode == "P"
    elif case == "exif":
        path = folder / "rotated.jpg"
        arr = np.full((40, 60, 3), 128, np.uint8)
        arr[:, :12] = (230, 20, 20)  # a red band on the left of the stored pixels: on top once turned
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(arr).save(path, quality=95, exif=exif.tobytes())
    elif case == "tiny":
        path = folder / "tiny.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
    elif case == "huge":
        path = folder / "huge.jpg"
        path.write_bytes(_jpeg_bytes(chelsea.resize((3000, 2000), Image.BILINEAR)))
    else:
        raise AssertionError(case)
    return path


# case → (phrase the status must contain, the upload fails)
UPLOADS = {
    "unreadable": ("not an image file", True),
    "truncated": ("truncated", True),
    "empty": ("empty", True),
    "16-bit": ("16-bit", False),
    "cmyk": ("CMYK", False),
    "palette": ("palette", False),
    "exif": ("EXIF orientation", False),
    "tiny": ("16-pixel patch", True),
    "huge": ("analysed at long side 512", False),
}


@pytest.mark.parametrize("case", list(UPLOADS))
def test_bad_or_unusual_upload_is_said_in_the_status(page, servers, tmp_path, case):
    phrase, fails = UPLOADS[case]
    path = make_upload(case, tmp_path)
    choose_class(page, "cat")
    wait_status(page, "Upload an image or pick a sample.")
    page.locator("#annotator input[type=file]").set_input_files(str(path))
    # the analysis ends in the phrase, a warning, the views' classes or, wrongly, an error badge
    wait_status_or_badge(page, servers, "Classes: cat", "⚠️", phrase)
    if not fails:
        for view in VIEWS:
            wait_new_src(page, view, None)
        shown = fetch_rgb(page, src(page, "view-initial"))
        if case == "16-bit":
            assert shown.mean() < 240, f"16-bit image clipped to white (view mean {shown.mean():.0f})"
        if case == "exif":
            assert shown.shape[0] > shown.shape[1], f"view is {shown.shape[1]}×{shown.shape[0]}, not portrait"
    text = status(page)
    assert phrase in text, text
    if fails:
        assert text.count("⚠️") == 1, text
        assert page.locator("#view-initial img").count() == 0
    else:
        assert "⚠️" not in text and "Classes: cat" in text, text
        if case == "huge":
            assert "3000×2000" in text, text

    pick_chelsea(page, absent=phrase)  # the session stays usable
    assert_no_error_badge(page, servers)


# ---------------------------------------------------------------- 2. custom vocabulary


def test_custom_vocabulary_words_become_the_classes(page, servers):
    page.locator("#vocabulary").get_by_text("custom", exact=True).click()
    page.locator("#custom-words textarea, #custom-words input").first.wait_for(state="visible")
    wait_status(page, "Upload an image or pick a sample.")
    assert_no_error_badge(page, servers)
    words = page.locator("#custom-words textarea, #custom-words input").first
    words.fill("kitten, sofa")
    words.press("Enter")
    page.wait_for_timeout(500)
    page.locator("#classes input").click()
    for name in ("kitten", "sofa"):
        page.get_by_role("option", name=name, exact=True).wait_for()
    assert page.get_by_role("option").count() == 2
    page.keyboard.press("Escape")
    # the server keeps working with the custom words: a sample, then one of them as its class
    page.locator("#samples img").nth([p.stem for p in sample_paths()].index("chelsea")).click()
    wait_status(page, "Choose the classes present in the image.")  # VOC's "cat" is not a custom class
    choose_class(page, "kitten")
    for view in VIEWS:
        wait_new_src(page, view, None)
    wait_status(page, "Classes: kitten")
    assert_no_error_badge(page, servers)


# ---------------------------------------------------------------- 3. layout


def test_views_and_sliders_fit_laptop_and_desktop_screens(browser, servers, demo_url):
    page = open_page(browser, demo_url, 1366, 768)
    try:
        pick_chelsea(page)
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(300)
        assert page.evaluate("window.scrollY") == 0
        for selector in [f"#{v} img" for v in VIEWS] + ["#alpha", "#n0", "#box-threshold"]:
            b = box(page, selector)
            assert inside(b, 1366, 768), f"{selector} at {b} is outside the 1366×768 viewport"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "studio-1366x768.png"))

        # each view's title against the buttons of its own view (fullscreen and the like)
        overlaps = page.evaluate("""(views) => views.map(id => {
            const view = document.getElementById(id);
            let column = view.parentElement;
            while (column && !column.querySelector('.view-title')) column = column.parentElement;
            const title = column.querySelector('.view-title').getBoundingClientRect();
            const buttons = [...view.querySelectorAll('button')].map(b => b.getBoundingClientRect())
                .filter(r => r.width > 0 && r.height > 0);
            const hit = buttons.filter(r => r.left < title.right && title.left < r.right &&
                                            r.top < title.bottom && title.top < r.bottom);
            return [id, buttons.length, hit.length];
        })""", list(VIEWS))
        for view_id, buttons, hits in overlaps:
            assert buttons >= 1, f"{view_id} has no button to compare its title with"
            assert hits == 0, f"the title of {view_id} overlaps {hits} of its buttons"

        page.set_viewport_size({"width": 1920, "height": 1080})
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(500)
        for selector in ["#alpha", "#n0", "#box-threshold", "#static-layers", "#bg-power", "#par-iterations"]:
            b = box(page, selector)
            assert inside(b, 1920, 1080), f"{selector} at {b} is outside the 1920×1080 viewport"
        page.screenshot(path=str(ARTIFACTS / "studio-1920x1080.png"))
        assert_no_error_badge(page, servers)
    finally:
        page.context.close()


# ---------------------------------------------------------------- 4. typed values outside a slider's range


def test_typed_alpha_outside_its_range_is_clamped(page, servers):
    pick_chelsea(page)
    static = src(page, "view-static")
    set_slider(page, "alpha", 9)
    wait_status_or_badge(page, servers, "outside 1..4")
    assert "α = 9 is outside 1..4: using 4" in status(page), status(page)
    wait_new_src(page, "view-static", static)
    page.wait_for_function("document.querySelector('#alpha input[type=number]').value === '4'")
    assert_no_error_badge(page, servers)


# ---------------------------------------------------------------- 5. the layer gallery


def test_layer_gallery_captions_tiles_and_zoom(page, servers):
    pick_chelsea(page)
    page.locator("#view-initial img").click(position={"x": 120, "y": 90})
    page.wait_for_function("document.querySelectorAll('#layers img').length === 12")
    captions = page.evaluate("""() => [...document.querySelectorAll('#layers .caption-label')].map(
        c => [c.innerText, c.scrollWidth, c.clientWidth, c.scrollHeight, c.clientHeight])""")
    assert len(captions) == 12, captions
    for n, (text, sw, cw, sh, ch) in enumerate(captions, start=1):
        assert f"l={n} " in text + " ", text
        assert sw <= cw + 1 and sh <= ch + 1, f"caption {text!r} is cut ({sw}×{sh} in {cw}×{ch})"

    gallery = page.locator("#layers")
    gallery.scroll_into_view_if_needed()
    outer = box(page, "#layers")
    tiles = page.locator("#layers img")
    for i in range(12):
        b = tiles.nth(i).bounding_box()
        assert b is not None and b["width"] > 20 and inside(b, outer["width"], outer["height"], outer["x"], outer["y"]), \
            f"tile {i + 1} at {b} is outside the gallery {outer}"
        assert tiles.nth(i).is_visible()

    tiles.nth(8).click()
    page.locator("#zoom img").wait_for()
    page.locator("#affinity img").wait_for()
    page.wait_for_function("['#zoom img', '#affinity img'].every(s => document.querySelector(s).complete"
                           " && document.querySelector(s).naturalWidth > 0)")
    zoom, affinity = box(page, "#zoom img"), box(page, "#affinity img")
    assert abs(zoom["width"] - affinity["width"]) <= 2 and abs(zoom["height"] - affinity["height"]) <= 2, \
        (zoom, affinity)
    assert_no_error_badge(page, servers)


# ---------------------------------------------------------------- 7. two tabs share the server


def test_a_second_tab_refines_while_the_first_adapts(browser, servers, demo_url):
    first = open_page(browser, demo_url)
    second = open_page(browser, demo_url)
    try:
        pick_chelsea(first)
        pick_chelsea(second)
        set_slider(first, "adapt-steps", 60)
        first.locator("#adapt").click()
        first.wait_for_timeout(1500)  # the adaptation is under way
        assert "Decoder adapted" not in status(first)
        static = src(second, "view-static")
        start = time.monotonic()
        set_slider(second, "alpha", 3)
        wait_new_src(second, "view-static", static)
        elapsed = time.monotonic() - start
        still_adapting = "Decoder adapted" not in status(first)
        assert elapsed < 5, f"the second tab waited {elapsed:.1f} s for a refinement"
        assert still_adapting, "the adaptation ended before the second tab's refinement: nothing was measured"
        wait_status(first, "Decoder adapted to chelsea")
        assert_no_error_badge(first, servers)
        assert_no_error_badge(second, servers)
    finally:
        first.context.close()
        second.context.close()


# ---------------------------------------------------------------- 6. ground truth (built-in model, last)


def test_generated_scene_brings_its_mask_and_live_iou(browser, servers):
    url = servers.get(["--clip", "synthetic"])
    page = open_page(browser, url)
    try:
        page.locator("#samples img").first.click()
        for view in VIEWS:
            wait_new_src(page, view, None)
        text = wait_status(page, "IoU % vs ground truth", "mIoU")
        iou_line = next(line for line in text.splitlines() if "IoU % vs ground truth" in line)
        static = src(page, "view-static")
        set_slider(page, "alpha", 3)
        wait_new_src(page, "view-static", static)
        text = wait_status(page, "IoU % vs ground truth", "mIoU")
        new_line = next(line for line in text.splitlines() if "IoU % vs ground truth" in line)
        assert "initial" in new_line and "RFM" in new_line, new_line
        print(f"α 2: {iou_line}\nα 3: {new_line}")
        assert_no_error_badge(page, servers)
    finally:
        page.context.close()


def test_sweeping_the_image_and_clicking_a_cell_sets_the_sliders(browser, servers):
    from rfm import viz

    page = open_page(browser, servers.get(["--clip", "synthetic"]))
    try:
        page.locator("#samples img").first.click()
        for view in VIEWS:
            wait_new_src(page, view, None)
        wait_status(page, "IoU % vs ground truth")
        page.locator("#image-sweep").get_by_text("Sweep this image — N0 × α").click()
        page.locator("#sweep").click()
        page.wait_for_function("document.querySelector('#sweep-caption').innerText.includes('Best label')")
        heatmap = page.locator("#sweep-heatmap img")
        natural = heatmap.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        shown = heatmap.bounding_box()
        (cw, ch), (left, top) = viz.SWEEP_CELL, viz.SWEEP_MARGIN
        static = src(page, "view-static")
        # the cell of row 1 (N0 = 8 of 7..12), column 2 (α = 3)
        heatmap.click(position={"x": (left + 2.5 * cw) * shown["width"] / natural[0],
                                "y": (top + 1.5 * ch) * shown["height"] / natural[1]})
        wait_new_src(page, "view-static", static)
        assert page.locator("#alpha input[type=number]").input_value() == "3"
        assert page.locator("#n0 input[type=number]").input_value() == "8"
        assert_no_error_badge(page, servers)
    finally:
        page.context.close()
