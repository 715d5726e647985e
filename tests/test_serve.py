"""Tests for serve.py and `cnnlab serve`: the JSON API over a real socket (Uvicorn on 127.0.0.1, a
free port, in a background thread; httpx as the client), good and bad requests, that nothing from a
request reaches the filesystem (Python's audit hook records every file opened while a request is
served), the command line; and the page in real headless Chromium driven by Playwright: a real MNIST
test digit drawn with mouse events, a stroke drawn by touch, an upload and a bad upload.

The API tests use a two-arm run of a small spec trained briefly on synthetic images; the page test
uses convnet7 trained for one epoch on 1,024 real MNIST images (skipped without CNNLAB_DATA_DIR)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

from cnnlab.api import execute, plan_run, prepare, report  # noqa: E402
from cnnlab.catalog import spec_from_text  # noqa: E402
from cnnlab.cli import main  # noqa: E402
from cnnlab.config import DataSelection, HardwareRequest, Recipe  # noqa: E402
from cnnlab.datasets import load_dataset  # noqa: E402
from cnnlab.images import MAX_SIDE, mnist_steps, preprocess  # noqa: E402
from cnnlab.predict import Predictor  # noqa: E402
from cnnlab.serve import MAX_JSON_BYTES, MAX_UPLOAD_BYTES, bind, create_app, url  # noqa: E402
from cnnlab_cli import cnnlab_command  # noqa: E402
from synthetic import SMALL_SPEC, learnable_arrays, write_dataset_folder  # noqa: E402

pytestmark = pytest.mark.serve

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def train(root: Path, name: str, models, data: DataSelection, recipes) -> Path:
    plan = plan_run(models, recipes=recipes, seeds=(0,), data=data, hardware=HardwareRequest(device="cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # synthetic files (and a trimmed MNIST) do not match the checksums
        prepared = prepare(plan, runs_dir=root, name=name)
        execute(prepared)
        report(prepared.folder.path)
    return prepared.folder.path


@contextlib.contextmanager
def running(run_dir: Path) -> Iterator[str]:
    """The app of `run_dir` served by Uvicorn on 127.0.0.1 (a free port) in a thread: its URL."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(run_dir), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            threading.Event().wait(0.01)
        assert server.started, "uvicorn did not start"
        yield url(sock).rstrip("/")
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(float).ravel(), b.astype(float).ravel())[0, 1])


# ---------------------------------------------------------------------------------------------
# The API


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    write_dataset_folder(root / "data" / "mnist", learnable_arrays(train=256, test=64))
    spec = spec_from_text(SMALL_SPEC, source="small.toml", default_name="small")
    recipes = [Recipe(epochs=1, batch_size=64), Recipe(epochs=1, batch_size=64, learning_rate=3e-4)]
    return train(root / "runs", "small", [spec], DataSelection(data_dir=str(root / "data")), recipes)


@pytest.fixture(scope="module")
def api(small_run) -> Iterator[httpx.Client]:
    with running(small_run) as base, httpx.Client(base_url=base, timeout=30) as client:
        yield client


def digits(count: int = 3) -> np.ndarray:
    return learnable_arrays(train=count, test=1, seed=7)["train_images"]


def test_info_describes_the_run_its_dataset_and_arms(api, small_run):
    info = api.get("/api/info").json()
    assert info["run"] == small_run.name and info["dataset"] == "mnist"
    assert info["classes"] == [str(d) for d in range(10)]
    assert [a["arm"] for a in info["arms"]] == ["small", "small@lr=0.0003"]
    assert [a["seed"] for a in info["arms"]] == [0, 0]
    chosen = [a for a in info["arms"] if a["chosen"]]
    assert len(chosen) == 1 and chosen[0]["basis"] == "chosen on the test set (optimistic)"
    assert info["explanation"].startswith(f"Arm {chosen[0]['arm']}, seed 0")
    assert info["report"] is True
    assert info["limits"] == {"upload_bytes": MAX_UPLOAD_BYTES, "json_bytes": MAX_JSON_BYTES, "side": MAX_SIDE}


def test_json_pixels_of_a_28x28_image_are_what_every_arm_sees(api, small_run):
    image = digits(1)[0]
    answer = api.post("/api/predict", json={"pixels": image.tolist()})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert np.array_equal(np.array(body["image"], dtype=np.uint8), image) and body["preprocessed"] is False
    assert [a["arm"] for a in body["arms"]] == ["small", "small@lr=0.0003"]
    for arm in body["arms"]:
        predictor = Predictor.open(small_run, arm=arm["arm"], seed=0)
        probabilities = predictor.predict(image[None])[0]
        expected = [int(i) for i in np.argsort(-probabilities, kind="stable")[:3]]
        assert [c["index"] for c in arm["top"]] == expected
        assert [c["class"] for c in arm["top"]] == [str(i) for i in expected]
        np.testing.assert_allclose([c["probability"] for c in arm["top"]], probabilities[expected], atol=1e-6)


def test_an_upload_is_preprocessed_for_the_dataset_like_cnnlab_predict(api):
    # A scan-like picture: a dark digit on light paper, 3x larger, off-centre.
    ink = np.kron(digits(2)[1], np.ones((3, 3), dtype=np.uint8))
    paper = np.full((120, 100), 250, dtype=np.uint8)
    paper[10:94, 4:88] = 250 - (ink.astype(int) * 240 // 255)
    answer = api.post("/api/predict", files={"file": ("scan.png", png(paper), "image/png")})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["preprocessed"] is True
    assert np.array_equal(np.array(body["image"], dtype=np.uint8), preprocess(paper, "mnist"))
    # A .npy array is an upload too (never unpickled).
    npy = api.post("/api/predict", files={"file": ("digit.npy", npy_bytes(digits(1)[0]), "application/octet-stream")})
    assert npy.status_code == 200 and np.array_equal(np.array(npy.json()["image"]), digits(1)[0])


def big_png() -> bytes:
    """A PNG over MAX_SIDE pixels wide that is only a few hundred bytes."""
    return png(np.zeros((1, MAX_SIDE + 1), dtype=np.uint8))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype == object)
    return buffer.getvalue()


BAD_REQUESTS = {
    "not JSON": (400, dict(content=b"{pixels: 1", headers={"Content-Type": "application/json"})),
    "no body": (400, dict(content=b"", headers={"Content-Type": "application/json"})),
    "a list, not an object": (422, dict(json=[[0] * 28] * 28)),
    "no pixels": (422, dict(json={"image": [[0] * 28] * 28})),
    "an unknown field": (422, dict(json={"pixels": [[0] * 28] * 28, "top_k": 5})),
    "ragged rows": (422, dict(json={"pixels": [[0] * 28] * 27 + [[0] * 27]})),
    "flat pixels": (422, dict(json={"pixels": [0] * 784})),
    "nested too deep": (422, dict(json={"pixels": [[[0, 0, 0]] * 28] * 28})),
    "floats": (422, dict(json={"pixels": [[0.5] * 28] * 28})),
    "booleans": (422, dict(json={"pixels": [[True] * 28] * 28})),
    "strings": (422, dict(json={"pixels": [["0"] * 28] * 28})),
    "over 255": (422, dict(json={"pixels": [[256] * 28] * 28})),
    "negative": (422, dict(json={"pixels": [[-1] * 28] * 28})),
    "huge integers": (422, dict(json={"pixels": [[10**30] * 28] * 28})),
    "empty": (422, dict(json={"pixels": []})),
    "a blank image (no ink)": (422, dict(json={"pixels": [[7] * 40] * 30})),
    "a JSON body too large": (
        413,
        dict(content=b'{"pixels": [' + b" " * MAX_JSON_BYTES + b"]}", headers={"Content-Type": "application/json"}),
    ),
    "too many rows": (413, dict(json={"pixels": [[0]] * (MAX_SIDE + 1)})),
    "no Content-Type": (415, dict(content=b"\x89PNG")),
    "a text Content-Type": (415, dict(content=b"hello", headers={"Content-Type": "text/plain"})),
    "a text file upload": (415, dict(files={"file": ("notes.txt", b"not an image at all\n", "text/plain")})),
    "a PDF upload": (415, dict(files={"file": ("doc.png", b"%PDF-1.4\n%...\n", "image/png")})),
    "a truncated PNG": (422, dict(files={"file": ("cut.png", png(np.full((50, 50), 9, np.uint8))[:60], "image/png")})),
    "an empty file": (422, dict(files={"file": ("empty.png", b"", "image/png")})),
    "a pickled .npy": (422, dict(files={"file": ("x.npy", npy_bytes(np.array([{"a": 1}], dtype=object)), "x")})),
    "a 3-D .npy": (422, dict(files={"file": ("x.npy", npy_bytes(np.zeros((2, 28, 28), np.uint8)), "x")})),
    "a blank upload": (422, dict(files={"file": ("white.png", png(np.full((64, 64), 255, np.uint8)), "image/png")})),
    "a picture too wide": (413, dict(files={"file": ("wide.png", big_png(), "image/png")})),
    "an upload too large": (413, dict(files={"file": ("big.png", b"\x89PNG" + b"0" * MAX_UPLOAD_BYTES, "image/png")})),
    "a form without 'file'": (400, dict(files={"image": ("x.png", png(np.zeros((28, 28), np.uint8)), "image/png")})),
    "a form of two files": (
        400,
        dict(files=[("file", ("a.png", b"\x89PNG", "image/png")), ("file", ("b.png", b"\x89PNG", "image/png"))]),
    ),
    "a form without a boundary": (400, dict(content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"})),
    "a malformed form": (400, dict(content=b"garbage", headers={"Content-Type": "multipart/form-data; boundary=zz"})),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_refused_with_one_line_of_json(api, case):
    status, request = BAD_REQUESTS[case]
    answer = api.post("/api/predict", **request)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
    assert "\n" not in body["error"] and "Traceback" not in body["error"]


def test_unknown_routes_and_methods_answer_json_errors(api):
    for method, path, status in [
        ("GET", "/nope", 404),
        ("GET", "/api/predict", 405),
        ("POST", "/api/info", 405),
        ("GET", "/page/../../../../etc/passwd", 404),
        ("GET", "/page/%2e%2e/%2e%2e/etc/passwd", 404),
        ("GET", "/report/../../etc/passwd", 404),
    ]:
        answer = api.request(method, path)
        assert answer.status_code == status, (method, path, answer.text)
        assert list(answer.json()) == ["error"] and "\n" not in answer.json()["error"]


@pytest.fixture()
def opened_files() -> Iterator[list[str]]:
    """Every path Python opens (in any thread) while the test runs, from the "open" audit event."""
    opened: list[str] = []
    active = [True]

    def hook(event: str, args: tuple) -> None:
        if active[0] and event in ("open", "os.listdir", "os.scandir", "os.remove", "os.rename"):
            opened.append(str(args[0]))

    sys.addaudithook(hook)  # audit hooks cannot be removed: this one goes quiet after the test
    try:
        yield opened
    finally:
        active[0] = False


def test_a_path_in_a_request_never_reaches_the_filesystem(api, small_run, opened_files):
    digit = png(digits(1)[0])
    for name in ("../../etc/passwd", "/etc/passwd", "..\\..\\windows\\win.ini", f"{small_run}/config.toml"):
        answer = api.post("/api/predict", files={"file": (name, digit, "image/png")})
        assert answer.status_code == 200, answer.text  # the bytes sent are the image: the name is ignored
        text = api.post("/api/predict", files={"file": (name, b"root:x:0:0:root:/root:/bin/bash\n", "text/plain")})
        assert text.status_code == 415 and "passwd" not in text.text
    for path in ("/report?file=/etc/passwd", "/?path=../../etc/passwd", "/page/app.js?f=../../etc/passwd"):
        assert api.get(path).status_code == 200
    touched = [p for p in opened_files if "passwd" in p or "win.ini" in p or p.endswith("config.toml")]
    assert touched == []
    assert {p for p in opened_files} <= {str(small_run / "report.html")}  # the only file read: the report


def test_the_page_and_the_report_are_served(api, small_run):
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert '<canvas id="pad"' in page.text and 'href="/report"' in page.text
    for asset, kind in (("/page/app.js", "text/javascript"), ("/page/style.css", "text/css")):
        answer = api.get(asset)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
    report_page = api.get("/report")
    assert report_page.status_code == 200 and report_page.content == (small_run / "report.html").read_bytes()
    moved = small_run / "report.html.moved"
    (small_run / "report.html").rename(moved)
    try:
        missing = api.get("/report")
        assert missing.status_code == 404 and "cnnlab report" in missing.json()["error"]
    finally:
        moved.rename(small_run / "report.html")


# ---------------------------------------------------------------------------------------------
# The command line


def test_cnnlab_serve_prints_its_url_and_serves_until_interrupted(small_run):
    process = subprocess.Popen(
        cnnlab_command("serve", str(small_run), "--port", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONUNBUFFERED": "1", **{k: v for k, v in os.environ.items() if k != "CNNLAB_DEBUG"}},
    )
    try:
        line = process.stdout.readline()
        assert line.startswith(f"Serving {small_run} at http://127.0.0.1:"), line + process.stderr.read()
        base = line.split(" at ")[1].split()[0].rstrip("/")
        assert httpx.get(base + "/api/info", timeout=30).json()["run"] == small_run.name
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        assert process.stdout.read().strip() == "Stopped." and process.stderr.read() == ""
    finally:
        if process.poll() is None:
            process.kill()


def test_cli_errors_are_one_line(small_run, tmp_path, capsys, monkeypatch):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", str(small_run), "--port", "70000"]) == 2
    with bind("127.0.0.1", 0) as taken:
        assert main(["serve", str(small_run), "--port", str(taken.getsockname()[1])]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("error: ") for e in errors)
    assert "--port 70000 is not a port" in errors[1] and "choose another --port" in errors[2]
    # Without the extra: one line saying how to install it.
    monkeypatch.delitem(sys.modules, "cnnlab.serve")
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert main(["serve", str(small_run)]) == 2
    assert capsys.readouterr().err.strip() == "error: cnnlab serve needs the web extra: pip install 'cnnlab[serve]'"


# ---------------------------------------------------------------------------------------------
# The page in headless Chromium


@pytest.fixture(scope="module")
def mnist_run(real_data_dir, tmp_path_factory) -> Path:
    """convnet7 trained for one epoch on 1,024 real MNIST training images."""
    data = DataSelection(data_dir=str(real_data_dir), limit_train=1024, limit_test=200)
    return train(tmp_path_factory.mktemp("serve-mnist"), "mnist", ["convnet7"], data, [Recipe(epochs=1)])


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file() and shutil.which("chromium") is None:
        pytest.skip(reason="the page test needs Chromium (/usr/bin/chromium)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium"), args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


def draw_digit(page, digit: np.ndarray, threshold: int = 128) -> None:
    """Trace the digit's ink with the mouse: each row's runs of pixels >= threshold as one stroke."""
    box = page.locator("#pad").bounding_box()  # with its 1 px border
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


def file_part(body: bytes) -> bytes:
    """The bytes of a multipart body's first file part (what the browser sent)."""
    boundary = body.split(b"\r\n", 1)[0]
    head, rest = body.split(b"\r\n\r\n", 1)
    assert b'name="file"' in head
    return rest[: rest.index(b"\r\n" + boundary)]


def seen_on_page(page, arm: str) -> np.ndarray:
    """The 28x28 image the page draws in an arm's card (its red channel)."""
    rgba = page.evaluate(
        """arm => Array.from(document.querySelector(`article[data-arm="${arm}"] canvas.seen`)
                 .getContext('2d').getImageData(0, 0, 28, 28).data)""",
        arm,
    )
    return np.array(rgba, dtype=np.uint8).reshape(28, 28, 4)[..., 0]


@pytest.mark.slow
def test_the_page_in_chromium_draws_uploads_and_shows_errors(mnist_run, real_data_dir, browser, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = load_dataset("mnist", data_dir=real_data_dir)
    digit = dataset.test_images[0].numpy()  # a 7
    with running(mnist_run) as base:
        context = browser.new_context(viewport={"width": 1100, "height": 760}, has_touch=True)
        page = context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        sent, bodies = [], []  # the requests to /api/predict, and their bodies (seen by an interception:
        page.on("request", lambda r: sent.append(r) if r.url.endswith("/api/predict") else None)

        def capture(route) -> None:  # Chromium's request events leave out bodies made of Blobs)
            bodies.append(route.request.post_data_buffer)
            route.continue_()

        page.route("**/api/predict", capture)
        page.goto(base + "/")
        page.wait_for_selector('article[data-arm="convnet7"]')
        assert page.locator("#report-link").is_visible()
        assert page.locator("#report-link").get_attribute("href") == "/report"

        # A real MNIST test digit, drawn with the mouse.
        draw_digit(page, digit)
        page.wait_for_selector("body[data-state=idle]", state="attached")
        assert len(sent) >= 2  # predicted while drawing, not only at the end
        last = sent[-1]
        answer = last.response().json()
        assert len(bodies) == len(sent)
        drawn = np.asarray(Image.open(io.BytesIO(file_part(bodies[-1]))))
        assert drawn.shape[:2] == (280, 280)
        seen = np.array(answer["image"], dtype=np.uint8)
        assert np.array_equal(seen, preprocess(drawn, "mnist"))  # the server's preprocessing of what was sent
        reference = mnist_steps(digit)  # the test digit through the same steps: cropped, 20x20, centred
        assert correlation(seen, reference) > 0.8, correlation(seen, reference)
        assert np.array_equal(seen_on_page(page, "convnet7"), seen)  # the page shows what the model saw
        api_top = httpx.post(base + "/api/predict", json={"pixels": seen.tolist()}).json()["arms"][0]["top"]
        card = page.locator('article[data-arm="convnet7"]')
        assert card.get_attribute("data-top") == api_top[0]["class"]  # (a model of 8 steps: not always the label)
        assert card.locator("li .label").all_inner_texts() == [c["class"] for c in api_top]
        assert page.locator("#error").is_hidden()
        assert problems == []
        page.screenshot(path=str(tmp_path / "drawn.png"))

        # A stroke drawn by touch (Chromium's touch input becomes pointer events).
        page.click("#clear")
        assert card.get_attribute("data-top") is None
        count = len(sent)
        box = page.locator("#pad").bounding_box()
        cdp = context.new_cdp_session(page)
        x = box["x"] + box["width"] / 2
        points = [(x, box["y"] + box["height"] * t) for t in np.linspace(0.15, 0.85, 12)]
        cdp.send(
            "Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": points[0][0], "y": points[0][1]}]}
        )
        for px, py in points[1:]:
            cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": px, "y": py}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        page.wait_for_selector("body[data-state=idle] article[data-top]")
        assert len(sent) > count
        touched = np.array(sent[-1].response().json()["image"], dtype=np.uint8)
        assert touched[:, 12:16].sum() > 0.8 * touched.sum()  # a vertical stroke in the middle

        # An upload: the digit as a user's scan, dark on light, 4x larger.
        scan = png(255 - np.kron(digit, np.ones((4, 4), dtype=np.uint8)))
        with page.expect_response(lambda r: r.url.endswith("/api/predict")) as response:
            page.set_input_files("#upload", files=[{"name": "digit.png", "mimeType": "image/png", "buffer": scan}])
        uploaded = response.value.json()
        assert bodies[-1].count(scan) == 1
        page.wait_for_selector("body[data-state=idle]", state="attached")
        assert card.get_attribute("data-top") == uploaded["arms"][0]["top"][0]["class"]
        assert np.array_equal(seen_on_page(page, "convnet7"), np.array(uploaded["image"], dtype=np.uint8))
        assert "digit.png" in page.locator("#status").inner_text()
        assert page.locator("#error").is_hidden()

        # A bad upload: an error on the page.
        with page.expect_response(lambda r: r.url.endswith("/api/predict")) as response:
            page.set_input_files("#upload", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}])
        assert response.value.status == 415
        page.wait_for_selector("body[data-state=idle]", state="attached")
        error = page.locator("#error")
        assert error.is_visible() and "not an image" in error.inner_text()
        assert error.inner_text() == response.value.json()["error"]
        assert [p for p in problems if "status of 415" not in p] == []
        context.close()
