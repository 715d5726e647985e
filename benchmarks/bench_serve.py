"""CPU benchmark of `cnnlab serve`'s API round trip: the latency of one image through
`POST /api/predict` (httpx, one kept-alive connection, to Uvicorn on 127.0.0.1 in another process),
for each built-in model, with the model already loaded.

- JSON: a 28x28 image as `{"pixels": [[...]]}` (used as it is); the answer parsed by the client;
- PNG: the page's request, a 280x280 drawing as a PNG in a multipart form, preprocessed by the server.

Each number is the median of `--calls` calls after 20 warm-up calls. Each model is a one-arm run
folder trained for one epoch on 256 MNIST images (the values of the weights do not change the time).

    python benchmarks/bench_serve.py --data-dir ../shared/data       # about a minute on 2 cores
    python benchmarks/bench_serve.py --data-dir DATA --calls 50 --models convnet7
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from cnnlab.api import execute, plan_run, prepare
from cnnlab.catalog import builtin_models
from cnnlab.config import DataSelection, HardwareRequest, Recipe
from cnnlab.predict import Predictor

SERVER = """
import sys
from cnnlab.serve import serve
serve(sys.argv[1], "127.0.0.1", 0, announce=lambda url: print(url, flush=True))
"""


def timed(call, repeats: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="timed calls per model and request kind")
    parser.add_argument("--models", nargs="*", default=builtin_models())
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("CNNLAB_DATA_DIR"), help="holds mnist/")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    drawing = np.full((280, 280), 255, dtype=np.uint8)
    drawing[60:220, 120:150] = 0  # a "1"
    buffer = io.BytesIO()
    Image.fromarray(drawing).save(buffer, format="PNG")
    png = buffer.getvalue()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            run_dir = write_run(Path(tmp), name, args.data_dir)
            rows.append((name, *measure(run_dir, image, png, args.calls)))
            print(f"{name}: JSON {rows[-1][1] * 1e3:.2f} ms, PNG {rows[-1][2] * 1e3:.2f} ms", file=sys.stderr)

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    cpu = platform.processor() or platform.machine()
    print(f"### serve: API round trip on the CPU ({datetime.now():%Y-%m-%d})\n")
    print(
        f"`POST /api/predict` with one image, httpx (one kept-alive connection) to `cnnlab serve`'s app on "
        f"Uvicorn at 127.0.0.1 in another process, the model loaded, fp32 on the CPU; "
        f"median of {args.calls} calls after 20 warm-up calls. For comparison, `Predictor.predict` alone, "
        f"in this process. Machine: {platform.platform()}, {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}. "
        f"Command: `{command}`.\n"
    )
    print("| model | JSON 28x28 ms | PNG 280x280 drawing ms | `Predictor.predict` alone ms |")
    print("| --- | ---: | ---: | ---: |")
    for name, json_s, png_s, alone_s in rows:
        print(f"| {name} | {json_s * 1e3:.2f} | {png_s * 1e3:.2f} | {alone_s * 1e3:.2f} |")


def write_run(root: Path, name: str, data_dir: Path) -> Path:
    """A one-arm run folder of `name`, seed 0, trained for one epoch on 256 images (a weight's value
    does not change the time of a forward pass)."""
    data = DataSelection(data_dir=str(data_dir), limit_train=256, limit_test=256)
    plan = plan_run([name], recipes=[Recipe(epochs=1)], seeds=(0,), data=data, hardware=HardwareRequest(device="cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(plan, runs_dir=root, name=name)
        execute(prepared)
    return prepared.folder.path


def measure(run_dir: Path, image: np.ndarray, png: bytes, calls: int) -> tuple[float, float, float]:
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        base = server.stdout.readline().strip().rstrip("/")
        with httpx.Client(base_url=base, timeout=30) as client:
            pixels = {"pixels": image.tolist()}
            json_s = timed(lambda: client.post("/api/predict", json=pixels).raise_for_status().json(), calls)
            files = {"file": ("drawing.png", png, "image/png")}
            png_s = timed(lambda: client.post("/api/predict", files=files).raise_for_status().json(), calls)
    finally:
        server.terminate()
        server.wait(30)
    predictor = Predictor.open(run_dir)
    alone_s = timed(lambda: predictor.predict(image[None]), calls)
    return json_s, png_s, alone_s


if __name__ == "__main__":
    main()
