"""`cnnlab serve RUN_DIR`: a small local web app to draw or upload an image and see what each arm of a
run predicts for it (FastAPI on Uvicorn, the `serve` extra: pip install 'cnnlab[serve]').

    from cnnlab.serve import create_app, serve

    app = create_app("runs/20261126-101500-compare")   # an ASGI app: one model per arm, loaded now
    serve("runs/20261126-101500-compare", host="127.0.0.1", port=8000)

Routes:

- `GET /`: the page (src/cnnlab/page/: HTML, CSS and JS, no CDN): a canvas to draw on (mouse, pen,
  touch), an upload button, one card per arm with its top 3 classes as bars and the 28x28 image the
  model saw, a link to the run's report;
- `GET /report`: the run folder's report.html (a path fixed at start-up);
- `GET /api/info`: the run, its dataset, classes and arms (with which arm the rule chooses and why);
- `POST /api/predict`: an image in, each arm's top 3 classes out, with the 28x28 image they saw:
  either JSON `{"pixels": [[0..255, ...], ...]}` (a rectangular grayscale image; a 28x28 one is used as
  it is, any other size is preprocessed) or a multipart form with the image file as `file` (PNG,
  JPEG, BMP, TIFF or a .npy array), preprocessed for the run's dataset by `images.preprocess`, the
  steps `cnnlab predict` uses. The answer:
  `{"image": [[...28 ints...] x 28], "preprocessed": bool, "arms": [{"arm", "seed", "top": [{"class",
  "index", "probability"} x 3]}]}`.

The page sends its canvas as a PNG (black ink on white paper, 280x280) in the multipart form, like an
upload: the server makes the 28x28 image with the dataset's own preprocessing (MNIST, KMNIST: ink
found, cropped, fit to a 20x20 box, centred by centre of mass; Fashion-MNIST: Zalando's steps), the
one implementation the command line uses too, and returns it for the page to show.

Limits: a multipart body of at most MAX_UPLOAD_BYTES, a JSON body of at most MAX_JSON_BYTES, images
of at most images.MAX_SIDE pixels a side (read from the header, before decoding). Errors are JSON
`{"error": "one line"}`: 400 (malformed request), 404, 405, 413 (too large), 415 (not JSON, a form or
a readable image) and 422 (well-formed but unusable: wrong shape or values, an image without ink).
Nothing from a request reaches the filesystem: uploads are read in memory, their file names are
never used, and the only files served are the page's, loaded at start-up, and the run's report.
"""

from __future__ import annotations

import io
import json
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.errors import CnnlabError, ConfigError, DataError
from cnnlab.images import MAX_SIDE, is_model_ready, preprocess, to_uint8
from cnnlab.predict import Predictor, open_predictors

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigError("cnnlab serve needs the web extra: pip install 'cnnlab[serve]'") from exc

MAX_UPLOAD_BYTES = 5_000_000  # a multipart body (the image file and the form around it)
MAX_JSON_BYTES = 1_000_000  # a JSON body: a 28x28 image is about 3 kB
TOP_K = 3
REPORT = "report.html"  # the report in the run folder (runfolder.py's layout)
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")  # Pillow's decoders the server uses, no other
_NPY_MAGIC = b"\x93NUMPY"
_PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class ApiError(Exception):
    """A request the API refuses: its HTTP status and a one-line message for the JSON body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Served:
    """What the app serves, loaded at start-up."""

    run: str
    dataset: str
    classes: tuple[str, ...]
    predictors: tuple[Predictor, ...]
    chosen: str | None  # the arm the rule chooses (predict.Predictor.open's default), if any
    explanation: str
    report: Path


def create_app(run_dir: Path | str) -> FastAPI:
    """The web app of a run folder: one model per arm (its first finished seed), loaded now on the CPU in fp32."""
    served = _load(Path(run_dir))
    page = {name: (resources.files("cnnlab.page") / name).read_bytes() for name in _PAGE_FILES}
    app = FastAPI(title="cnnlab serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        messages = {404: f"no such page: {request.url.path}; the API is GET /api/info and POST /api/predict"}
        message = messages.get(exc.status_code) or f"{request.method} {request.url.path}: {exc.detail}"
        return _error(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error ({type(exc).__name__}); run cnnlab serve with --debug for details")

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return _page_file(page, "index.html")

    @app.get("/page/app.js", include_in_schema=False)
    async def script() -> Response:
        return _page_file(page, "app.js")

    @app.get("/page/style.css", include_in_schema=False)
    async def style() -> Response:
        return _page_file(page, "style.css")

    @app.get("/report", include_in_schema=False)
    async def report() -> Response:
        try:
            content = served.report.read_bytes()
        except OSError:
            raise ApiError(
                404, f"the run has no report yet; write it with `cnnlab report {served.report.parent}`"
            ) from None
        return Response(content, media_type="text/html; charset=utf-8", headers={"X-Content-Type-Options": "nosniff"})

    @app.get("/api/info")
    async def info() -> JSONResponse:
        return _json(
            {
                "run": served.run,
                "dataset": served.dataset,
                "classes": list(served.classes),
                "explanation": served.explanation,
                "arms": [
                    {"arm": p.arm, "seed": p.seed, "chosen": p.arm == served.chosen, "basis": p.basis}
                    for p in served.predictors
                ],
                "report": served.report.is_file(),
                "limits": {"upload_bytes": MAX_UPLOAD_BYTES, "json_bytes": MAX_JSON_BYTES, "side": MAX_SIDE},
            }
        )

    @app.post("/api/predict")
    async def predict(request: Request) -> JSONResponse:
        kind = parse_options_header(request.headers.get("content-type", ""))[0].decode("latin-1").lower()
        if kind == "application/json":
            pixels = _json_pixels(await _body(request, MAX_JSON_BYTES, "a JSON body"))
            if is_model_ready(pixels):  # a forward pass of about a millisecond: a thread would double the time
                return _json(_predict(served, pixels, "the pixels"))
            return _json(await run_in_threadpool(_predict, served, pixels, "the pixels"))
        if kind == "multipart/form-data":
            body = await _body(request, MAX_UPLOAD_BYTES, "an upload")
            data = _form_file(body, request.headers["content-type"])
            return _json(await run_in_threadpool(_predict_upload, served, data))
        raise ApiError(
            415,
            f'Content-Type {kind or "(none)"} is not accepted; send JSON {{"pixels": [[...], ...]}} '
            "or a multipart/form-data upload with the image as 'file'",
        )

    return app


def serve(
    run_dir: Path | str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "warning",
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve the app of `run_dir` on http://host:port (port 0: a free one) until interrupted (Ctrl+C);
    `announce` is called with the URL once the port is open."""
    app = create_app(run_dir)
    sock = bind(host, port)
    if announce is not None:
        announce(url(sock))
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"))
    uvicorn.Server(config).run(sockets=[sock])


def url(sock: socket.socket) -> str:
    """The http:// URL of a listening socket."""
    address, port = sock.getsockname()[:2]
    return f"http://[{address}]:{port}/" if ":" in address else f"http://{address}:{port}/"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a ConfigError saying why not."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a port; give one from 1 to 65535")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: not an address of this machine ({exc.strerror}); e.g. 127.0.0.1") from None
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it every answer waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(info[0], socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port (or --host)"
        ) from None
    sock.set_inheritable(True)
    return sock


# ---------------------------------------------------------------------------------------------
# Loading the run


def _load(run_dir: Path) -> Served:
    predictors, _, _ = open_predictors(run_dir, all_arms=True)
    chosen, explanation = None, f"Every arm of the run ({len(predictors)}), each with its first finished seed."
    try:
        (default,), _, explanation = open_predictors(run_dir)
    except CnnlabError:  # no arm can be chosen (accuracies not numbers): show them all, none marked
        pass
    else:
        chosen = default.arm
        predictors = [default if p.arm == default.arm else p for p in predictors]
    first = predictors[0]
    return Served(
        run=run_dir.resolve().name,
        dataset=first.dataset,
        classes=first.classes,
        predictors=tuple(predictors),
        chosen=chosen,
        explanation=explanation,
        report=run_dir.resolve() / REPORT,
    )


# ---------------------------------------------------------------------------------------------
# Requests


async def _body(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes."""
    too_large = ApiError(413, f"{what} of more than {limit / 1e6:g} MB is too large; send a smaller image")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "the Content-Length header is not a number")
        if int(length) > limit:
            raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    if size == 0:
        raise ApiError(400, f"the request has no body; send {what}")
    return b"".join(chunks)


def _json_pixels(body: bytes) -> np.ndarray:
    """{"pixels": H x W integers 0..255} -> uint8 (H, W)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f'the body is not valid JSON ({exc}); send {{"pixels": [[...], ...]}}') from None
    if not isinstance(document, dict) or "pixels" not in document:
        raise ApiError(422, "the JSON must be an object with 'pixels': a list of rows of integers 0..255")
    unknown = sorted(set(document) - {"pixels"})
    if unknown:
        raise ApiError(422, f"unknown field(s) {', '.join(map(repr, unknown))}; the JSON holds only 'pixels'")
    rows = document["pixels"]
    if not isinstance(rows, list) or not rows or not all(isinstance(row, list) and row for row in rows):
        raise ApiError(422, "'pixels' must be a non-empty list of non-empty rows (lists) of integers 0..255")
    width = len(rows[0])
    if any(len(row) != width for row in rows):
        raise ApiError(422, "'pixels' rows differ in length; every row must have as many pixels as the first")
    if len(rows) > MAX_SIDE or width > MAX_SIDE:
        raise ApiError(413, f"{width}x{len(rows)} pixels is too large (at most {MAX_SIDE}x{MAX_SIDE})")
    if not all(type(v) is int for row in rows for v in row):  # bools and floats are refused too
        raise ApiError(422, "'pixels' must hold integers 0..255 only (no floats, booleans, strings or nested lists)")
    array = np.array(rows, dtype=np.int64) if _fits_int64(rows) else None
    if array is None or array.min() < 0 or array.max() > 255:
        raise ApiError(422, "'pixels' values must be integers from 0 to 255")
    return array.astype(np.uint8)


def _fits_int64(rows: list[list[int]]) -> bool:
    return all(-(2**63) <= v < 2**63 for row in rows for v in row)


def _form_file(body: bytes, content_type: str) -> bytes:
    """The bytes of the form's 'file' part, parsed in memory (the part's file name is never used)."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise ApiError(400, "the multipart/form-data Content-Type has no boundary")
    parts: list[tuple[bytes, bytearray]] = []
    header: dict[str, bytearray] = {"field": bytearray(), "value": bytearray()}
    disposition = bytearray()

    def on_part_begin() -> None:
        disposition.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        if bytes(header["field"]).lower() == b"content-disposition":
            disposition[:] = header["value"]
        header["field"].clear()
        header["value"].clear()

    def on_headers_finished() -> None:
        name = parse_options_header(bytes(disposition))[1].get(b"name", b"")
        parts.append((name, bytearray()))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1][1].extend(data[start:end])

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, f"the multipart body is malformed ({exc}); send a form with the image as 'file'") from None
    files = [bytes(data) for name, data in parts if name == b"file"]
    if len(files) != 1:
        found = "no" if not files else f"{len(files)}"
        raise ApiError(400, f"the form has {found} 'file' field(s); send exactly one image as 'file'")
    if not files[0]:
        raise ApiError(422, "the uploaded file is empty (0 bytes); send an image file")
    return files[0]


# ---------------------------------------------------------------------------------------------
# Predicting


def _predict_upload(served: Served, data: bytes) -> dict[str, Any]:
    return _predict(served, _decode(data), "the upload")


def _predict(served: Served, image: np.ndarray, name: str) -> dict[str, Any]:
    ready = is_model_ready(image)
    try:
        seen = preprocess(image, served.dataset, name)
    except DataError as exc:
        raise ApiError(422, str(exc)) from None
    arms = []
    for predictor in served.predictors:
        (top,) = predictor.top_k(predictor.predict(seen[None]), TOP_K)
        arms.append(
            {
                "arm": predictor.arm,
                "seed": predictor.seed,
                "top": [{"class": c.name, "index": c.index, "probability": c.probability} for c in top],
            }
        )
    return {"image": seen.tolist(), "preprocessed": not ready, "arms": arms}


def _decode(data: bytes) -> np.ndarray:
    """An uploaded file's pixels: a .npy array (never a pickle) or a PNG, JPEG, BMP or TIFF picture."""
    if data.startswith(_NPY_MAGIC):
        return _decode_npy(data)
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as picture:
                width, height = picture.size  # from the header: nothing is decoded yet
                if max(width, height) > MAX_SIDE:
                    raise ApiError(
                        413, f"a picture of {width}x{height} pixels is too large (at most {MAX_SIDE}x{MAX_SIDE})"
                    )
                picture.load()
                return _pixels(ImageOps.exif_transpose(picture))
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "the picture has too many pixels (a decompression bomb?); send a smaller one") from None
    except UnidentifiedImageError:
        raise ApiError(415, "the upload is not an image cnnlab reads; send a PNG, JPEG, BMP or TIFF file") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ApiError(422, f"the picture cannot be decoded ({_first_line(exc)}); the file is damaged") from None


def _pixels(picture: Any) -> np.ndarray:
    """A decoded Pillow picture as uint8 (H, W), (H, W, 3) or (H, W, 4), as images.read_images makes them."""
    mode = picture.mode
    if mode.startswith(("I", "F")):  # 16/32-bit integer or float grayscale
        try:
            return to_uint8(np.asarray(picture), "the upload")
        except DataError as exc:
            raise ApiError(422, str(exc)) from None
    target = {"L": "L", "1": "L", "RGB": "RGB", "RGBA": "RGBA", "LA": "RGBA", "La": "RGBA", "PA": "RGBA"}.get(mode)
    if target is None:
        target = "RGBA" if mode == "P" and "transparency" in picture.info else "RGB"
    return np.asarray(picture if mode == target else picture.convert(target), dtype=np.uint8).copy()


def _decode_npy(data: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise ApiError(422, "the .npy upload holds Python objects (a pickle), which cnnlab never loads") from None
        raise ApiError(422, f"the upload is not a valid .npy array ({_first_line(exc)})") from None
    except (OSError, EOFError) as exc:
        raise ApiError(422, f"the .npy upload cannot be read ({_first_line(exc)}); the file is damaged") from None
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))) or min(array.shape[:2]) == 0:
        raise ApiError(422, f"the .npy upload of shape {array.shape} is not one image; send (H, W) or (H, W, 3|4)")
    if max(array.shape[:2]) > MAX_SIDE:
        raise ApiError(413, f"an array of {array.shape[1]}x{array.shape[0]} pixels is too large (at most {MAX_SIDE})")
    try:
        return to_uint8(array, "the upload")
    except DataError as exc:
        raise ApiError(422, str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Responses


def _json(content: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(content, status_code=status, headers={"Cache-Control": "no-store"})


def _error(status: int, message: str) -> JSONResponse:
    return _json({"error": _first_line_text(message)}, status)


def _page_file(page: dict[str, bytes], name: str) -> Response:
    headers = {
        "Content-Security-Policy": _PAGE_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }
    return Response(page[name], media_type=f"{_PAGE_FILES[name]}; charset=utf-8", headers=headers)


def _first_line(exc: BaseException) -> str:
    return _first_line_text(str(exc)) or type(exc).__name__


def _first_line_text(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= 300 else line[:299] + "…"
