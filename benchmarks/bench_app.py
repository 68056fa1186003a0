"""Slider-to-views latency of the web app: ViT-B/16-sized random CLIP + random WeCLIP decoder, a
VOC-sized image (500×375), PAR 20 iterations, a pixel inspected (so the layer views exist).

Server side: the refine handler (``Studio.refine``: predictor.refine + the views that changed
drawn) plus the output components' postprocessing (the image encoding Gradio does before it can
answer). Browser (unless --no-browser), Playwright driving headless Chromium on this machine:
  isolated   — type a new α, wait until the static, RFM and label views show new, loaded images;
  under load — change λ every 0.3 s without waiting; for each change, the time until the status
               line (sent with the views) shows that value or a later one. Budgets (DESIGN.md,
               issue 10): median ≤ 300 ms isolated, ≤ 450 ms under load.

    .venv/bin/python benchmarks/bench_app.py [--repeats 15] [--no-browser]
"""
from __future__ import annotations

import argparse
import re
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
from rfm.render import Display, Views  # noqa: E402
from rfm.session import Controls, Models  # noqa: E402
from rfm.text import get_vocabulary  # noqa: E402
from rfm.ui import CSS, Studio, build_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ISOLATED_BUDGET_S, LOADED_BUDGET_S = 0.3, 0.45
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEW_IDS = ("view-initial", "view-static", "view-rfm", "view-label", "rfm-note", "legend", "chart", "layers",
            "zoom", "affinity", "status")


def voc_sized_photo(folder: Path) -> Path:
    path = folder / "photo_500x375.png"
    Image.open(ROOT / "assets" / "chelsea.png").convert("RGB").resize((500, 375), Image.BICUBIC).save(path)
    return path


def server_side(studio: Studio, app, photo: Path, repeats: int) -> tuple[float, float]:
    """Median seconds of (handler alone, handler + output postprocessing) for alternating α."""
    background = ", ".join(get_vocabulary("voc").background)
    display = Display("cat", False)
    session = studio.analyse(None, {"image": str(photo), "boxes": []}, ["cat", "dog"], "VOC", "", background, None,
                             Controls(), display)[0]
    studio.inspect(session, 250, 180, display)
    by_id = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    components = [by_id[i] for i in VIEW_IDS]
    assert len(components) == len(Views.names())
    handler, total = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        outputs = studio.refine(session, Controls(alpha=3 if i % 2 == 0 else 2), display)[1:1 + len(components)]
        t1 = time.perf_counter()
        for component, value in zip(components, outputs):
            if not isinstance(value, dict):  # dicts are skips and prop updates: nothing to encode
                component.postprocess(value)
        t2 = time.perf_counter()
        if i:  # the first call warms caches
            handler.append(t1 - t0)
            total.append(t2 - t0)
    return statistics.median(handler), statistics.median(total)


STATUS_LOG = """() => { window.__status = []; const node = document.querySelector('#status');
  new MutationObserver(() => window.__status.push([performance.now(), node.innerText]))
    .observe(node, {subtree: true, childList: true, characterData: true}); }"""


def in_browser(studio: Studio, photo: Path, repeats: int) -> tuple[list[float], list[float]]:
    """(isolated latencies, under-load latencies) in seconds."""
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(studio).queue(default_concurrency_limit=4)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=CSS)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#classes input").click()
            page.locator("#classes input").fill("cat")
            page.get_by_role("option", name="cat", exact=True).click()
            page.locator("#annotator input[type=file]").set_input_files(str(photo))
            page.wait_for_function("document.querySelector('#view-label img') !== null")
            page.locator("#view-initial img").click(position={"x": 60, "y": 45})
            page.wait_for_function("document.querySelectorAll('#layers img').length > 0")
            isolated = []
            for i in range(repeats + 1):
                old = [page.locator(f"#{v} img").get_attribute("src") for v in ("view-static", "view-rfm", "view-label")]
                box = page.locator("#alpha input[type=number]")
                t0 = time.perf_counter()  # before typing: the number box may send its input event already
                box.fill(str(3 if i % 2 == 0 else 2))
                box.press("Enter")
                page.wait_for_function(
                    "(old) => ['#view-static img', '#view-rfm img', '#view-label img'].every((sel, k) => {"
                    " const img = document.querySelector(sel); return img && img.src !== old[k] && img.complete; })",
                    arg=old, polling="raf")
                if i:
                    isolated.append(time.perf_counter() - t0)

            # under load: λ = 0.10, 0.15, … typed every 0.3 s; all values distinct, so a status showing
            # λ_j answers every change i ≤ j
            page.evaluate(STATUS_LOG)
            values = [round(0.10 + 0.05 * k, 2) for k in range(max(repeats, 8))]
            box = page.locator("#box-threshold input[type=number]")
            sent = []
            for value in values:
                sent.append((page.evaluate("performance.now()"), value))
                box.fill(str(value))
                box.press("Enter")
                page.wait_for_timeout(300)
            page.wait_for_function(f"() => window.__status.some(([t, s]) => s.includes('λ {values[-1]:g},'))")
            log = page.evaluate("window.__status")
            browser.close()
    finally:
        app.close()
    shown = [(t, float(m.group(1))) for t, text in log for m in [re.search(r"λ ([0-9.]+),", text)] if m]
    loaded = []
    for i, (t_sent, _) in enumerate(sent):
        later = {v for _, v in sent[i:]}
        answer = next(t for t, v in shown if t >= t_sent and v in later)
        loaded.append((answer - t_sent) / 1000)
    return isolated, loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    studio = Studio(Models(random_clip(device="cpu"), Decoder().eval(), device="cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        photo = voc_sized_photo(Path(tmp))
        with ThreadPoolExecutor(1) as worker:  # Gradio runs handlers in worker threads, not the main one
            handler, total = worker.submit(server_side, studio, build_app(studio), photo, args.repeats).result()
        print("slider change (ViT-B/16 random, 500×375, PAR 20, layer gallery shown), medians:")
        print(f"  server: handler (refine + changed views drawn)   {handler * 1000:7.1f} ms")
        print(f"  server: + output encoding = all views ready      {total * 1000:7.1f} ms")
        if not args.no_browser:
            isolated, loaded = in_browser(studio, photo, args.repeats)
            for name, times, budget in (("isolated", isolated, ISOLATED_BUDGET_S),
                                        ("changes 0.3 s apart", loaded, LOADED_BUDGET_S)):
                median = statistics.median(times)
                print(f"  browser, {name:<20} median {median * 1000:6.0f} ms  (min {min(times) * 1000:.0f}, max "
                      f"{max(times) * 1000:.0f}, n={len(times)})   budget {budget * 1000:.0f} ms   "
                      f"{'OK' if median <= budget else 'OVER BUDGET'}")


if __name__ == "__main__":
    main()
