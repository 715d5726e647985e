"""The README's screenshot of `cnnlab serve`: the real page in headless Chromium (Playwright), a real
MNIST test digit drawn on the canvas with mouse events, the predictions shown, saved as a PNG.

    python benchmarks/screenshot_serve.py RUN_DIR --data-dir ../shared/data            # docs/serve.png
    python benchmarks/screenshot_serve.py RUN_DIR --data-dir DATA --index 3 --out shot.png

RUN_DIR is an MNIST run folder (e.g. `cnnlab compare --models convnet3 --models convnet7 --epochs 3
--limit-train 5000`). Needs the serve extra and Chromium (--chromium, default /usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import threading
import time
import warnings
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from cnnlab.datasets import load_dataset
from cnnlab.serve import bind, create_app, url

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def draw(page, digit, threshold: int = 128) -> None:
    """Trace the digit's ink with the mouse, row by row, as short strokes scaled to the canvas."""
    box = page.locator("#pad").bounding_box()
    scale = (box["width"] - 2) / 28
    at = lambda x, y: (box["x"] + 1 + (x + 0.5) * scale, box["y"] + 1 + (y + 0.5) * scale)
    for y in range(28):
        x = 0
        while x < 28:
            if digit[y, x] < threshold:
                x += 1
                continue
            end = x
            while end + 1 < 28 and digit[y, end + 1] >= threshold:
                end += 1
            page.mouse.move(*at(x, y))
            page.mouse.down()
            page.mouse.move(*at(end, y), steps=max(1, end - x))
            page.mouse.up()
            x = end + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data-dir", type=Path, required=True, help="the folder holding mnist/")
    parser.add_argument("--index", type=int, default=0, help="the MNIST test image to draw")
    parser.add_argument("--out", type=Path, default=Path("docs/serve.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        digit = load_dataset("mnist", data_dir=args.data_dir).test_images[args.index].numpy()
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(args.run_dir), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1000, "height": 560}, device_scale_factor=1)
            page.goto(url(sock))
            page.wait_for_selector("article[data-arm]")
            draw(page, digit)
            page.wait_for_selector("body[data-state=idle] article[data-top]")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            tops = page.locator("article[data-arm]").evaluate_all(
                "cards => cards.map(c => c.dataset.arm + ': ' + c.dataset.top)"
            )
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    print(f"{args.out}: test image {args.index} drawn; top classes {', '.join(tops)}")


if __name__ == "__main__":
    main()
