"""From `python app.py` to the four views of a generated scene in the browser (goal ≤ 20 s).

Starts the app as `make app` does (default flags: the built-in model when checkpoints/ViT-B-16.pt
is absent), opens it in headless Chromium, clicks the first sample (a generated scene) and waits
until the initial, static, RFM and label views all show an image.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 3] [--args "--clip synthetic"]
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWS = ("view-initial", "view-static", "view-rfm", "view-label")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def once(browser, extra: list[str]) -> tuple[float, float]:
    """(seconds to the server answering, seconds to all four views) from process start."""
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", *extra, "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("app.py exited before serving")
                time.sleep(0.1)
        served = time.perf_counter() - t0
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.locator("#samples img").first.click()
        for view in VIEWS:
            page.wait_for_selector(f"#{view} img")
        shown = time.perf_counter() - t0
        page.close()
        return served, shown
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--args", default="", help="extra app.py flags (default: none, as `make app`)")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        runs = [once(browser, shlex.split(args.args)) for _ in range(args.repeats)]
        browser.close()
    for served, shown in runs:
        print(f"server answering after {served:.1f} s, four views of a generated scene after {shown:.1f} s")
    print(f"median to first views: {statistics.median(s for _, s in runs):.1f} s (goal ≤ 20 s)")


if __name__ == "__main__":
    main()
