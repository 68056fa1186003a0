"""Slider-to-render time of the web app: ViT-B/16-sized random CLIP + random WeCLIP decoder, a VOC-sized
image (500×375), budget ≤ 0.5 s.

Server side: the α-slider handler (``Studio.refine``: predictor.refine + every view drawn, with a pixel
inspected so the layer gallery is redrawn too) plus the output components' postprocessing (the image
encoding Gradio does before it can answer), from call to all view outputs ready.
Browser (unless --no-browser): Playwright changes α in headless Chromium and waits until the static,
RFM and label views all show new images.

    .venv/bin/python benchmarks/bench_app.py [--repeats 10] [--no-browser]
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rfm.backbone import random_clip  # noqa: E402
from rfm.decoder import Decoder  # noqa: E402
from rfm.ui import Models, Studio, build_app, get_vocabulary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 0.5
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEW_IDS = ("view-initial", "view-static", "view-rfm", "view-label", "rfm-note", "legend", "chart", "layers",
            "affinity", "status")


def voc_sized_photo(folder: Path) -> Path:
    path = folder / "photo_500x375.png"
    Image.open(ROOT / "assets" / "chelsea.png").convert("RGB").resize((500, 375), Image.BICUBIC).save(path)
    return path


def output_components(app) -> list:
    by_id = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    return [by_id[i] for i in VIEW_IDS]


def server_side(studio: Studio, app, photo: Path, repeats: int) -> tuple[float, float]:
    """Median seconds of (handler alone, handler + output postprocessing) for alternating α."""
    background = ", ".join(get_vocabulary("voc").background)
    session = studio.analyse(None, {"image": str(photo), "boxes": []}, ["cat", "dog"], "VOC", "", background,
                             2, 7, 8, 0.4, 1.0, 20, "abs", "cat", False)[0]
    studio.inspect(session, 250, 180, "cat", False)
    components = output_components(app)
    handler, total = [], []
    for i in range(repeats + 1):
        alpha = 3 if i % 2 == 0 else 2
        t0 = time.perf_counter()
        outputs = studio.refine(session, alpha, 7, 8, 0.4, 1.0, 20, "abs", "cat", False)[1:]
        t1 = time.perf_counter()
        for component, value in zip(components, outputs):
            if not isinstance(value, dict):  # dicts are prop updates (visibility), nothing to encode
                component.postprocess(value)
        t2 = time.perf_counter()
        if i:  # the first call warms caches
            handler.append(t1 - t0)
            total.append(t2 - t0)
    return statistics.median(handler), statistics.median(total)


def in_browser(studio: Studio, photo: Path, repeats: int) -> float:
    """Median seconds from typing a new α to the static, RFM and label views all replaced."""
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(studio).queue(default_concurrency_limit=4)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#classes input").click()
            page.locator("#classes input").fill("cat")
            page.get_by_role("option", name="cat", exact=True).click()
            page.locator("#annotator input[type=file]").set_input_files(str(photo))
            page.wait_for_function("document.querySelector('#view-label img') !== null")
            page.locator("#view-initial img").click(position={"x": 120, "y": 90})
            page.wait_for_function("document.querySelectorAll('#layers img').length > 0")
            times = []
            for i in range(repeats + 1):
                old = [page.locator(f"#{v} img").get_attribute("src") for v in ("view-static", "view-rfm")]
                box = page.locator("#alpha input[type=number]")
                box.fill(str(3 if i % 2 == 0 else 2))
                t0 = time.perf_counter()
                box.press("Enter")
                page.wait_for_function(
                    "(old) => ['#view-static img', '#view-rfm img'].every((sel, k) => {"
                    " const img = document.querySelector(sel); return img && img.src !== old[k] && img.complete; })",
                    arg=old, polling="raf")
                if i:
                    times.append(time.perf_counter() - t0)
            browser.close()
    finally:
        app.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    studio = Studio(Models(random_clip(device="cpu"), Decoder().eval(), device="cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        photo = voc_sized_photo(Path(tmp))
        with ThreadPoolExecutor(1) as worker:  # Gradio runs handlers in worker threads, not the main one
            handler, total = worker.submit(server_side, studio, build_app(studio), photo, args.repeats).result()
        print("slider change, server side (ViT-B/16 random, 500×375, PAR 20, layer gallery shown):")
        print(f"  handler (predictor.refine + drawing)        {handler * 1000:7.1f} ms")
        print(f"  + output encoding = all views ready         {total * 1000:7.1f} ms   budget {BUDGET_S * 1000:.0f} ms"
              f"   {'OK' if total <= BUDGET_S else 'OVER BUDGET'}")
        if not args.no_browser:
            browser = in_browser(studio, photo, args.repeats)
            print(f"  in the browser (type α → views replaced)    {browser * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
