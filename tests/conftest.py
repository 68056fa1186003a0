"""Shared fixtures: small random CLIPs built locally (no weights can be downloaded here) and voc-mini."""
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from rfm.backbone import random_clip

VOC_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc-mini"
# A CLIP small enough for fast tests but with every structural feature of ViT-B/16:
# 16-pixel patches, several heads, pretrained 14×14 grid to interpolate from.
SMALL_CLIP = dict(width=128, layers=4, patch_size=16, image_size=224, embed_dim=64, text_width=64, text_layers=1)


@pytest.fixture(scope="session")
def small_clip():
    torch.manual_seed(0)
    return random_clip(device="cpu", seed=0, **SMALL_CLIP)


@pytest.fixture(scope="session")
def voc_mini():
    if not VOC_MINI.is_dir():
        pytest.skip(f"voc-mini not found at {VOC_MINI} (it lives in ../shared/data beside the checkout)")
    return VOC_MINI


def voc_image(root: Path, stem: str):
    """(image path, ground-truth mask) of a voc-mini sample; extensions are not assumed."""
    path = next(p for p in (root / "JPEGImages").iterdir() if p.stem == stem)
    from PIL import Image

    return path, np.asarray(Image.open(root / "SegmentationClass" / f"{stem}.png"))


@pytest.fixture(scope="session")
def weight_files(tmp_path_factory):
    """clip.pt (OpenAI-format state dict of SMALL_CLIP) and decoder.safetensors (project format) on disk."""
    from rfm.backbone import random_clip_state_dict
    from rfm.decoder import Decoder

    folder = tmp_path_factory.mktemp("weights")
    torch.save(random_clip_state_dict(seed=0, **SMALL_CLIP), folder / "clip.pt")
    torch.manual_seed(0)
    Decoder(width=SMALL_CLIP["width"], num_blocks=SMALL_CLIP["layers"] - 1, embed_dim=32, heads=4,
            layers=1).save(folder / "decoder.safetensors")
    return folder


def free_port() -> int:
    """A localhost port nobody listens on right now, for test servers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the browser tests' shared pieces

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through Playwright (it cannot download its own browser here)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `apt-get install chromium` (the browser tests need it; "
                    f"Playwright cannot download its own browser here)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def src(page, view: str) -> str | None:
    return page.locator(f"#{view} img").first.get_attribute("src") if page.locator(f"#{view} img").count() else None


def wait_new_src(page, view: str, old: str | None) -> str:
    page.wait_for_function("([sel, old]) => { const img = document.querySelector(sel);"
                           " return img !== null && img.src !== old; }", arg=[f"#{view} img", old or ""])
    return src(page, view)


def fetch_rgb(page, url: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.request.get(url).body())).convert("RGB"))


def set_slider(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


class Servers:
    """``app.py`` for the browser tests, started on a free port and waited for; one per instance at a time (the
    machine is small): asking for other arguments stops the running one."""

    def __init__(self, folder: Path):
        self.folder, self.proc, self.args, self.url, self.log = folder, None, None, None, None

    def get(self, args: list[str]) -> str:
        if args == self.args and self.proc.poll() is None:
            return self.url
        self.stop()
        port = free_port()
        self.log = self.folder / f"app-{len(list(self.folder.glob('app-*.log')))}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "app.py", *args, "--device", "cpu", "--port", str(port)],
                                         cwd=Path(__file__).resolve().parents[1], stdout=out,
                                         stderr=subprocess.STDOUT)
        self.args, self.url = args, f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return self.url
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"app.py {' '.join(args)} did not start:\n{self.tail()}")
                time.sleep(0.5)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-1200:] if self.log else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = self.args = self.url = None


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    servers = Servers(tmp_path_factory.mktemp("studio"))
    yield servers
    servers.stop()
