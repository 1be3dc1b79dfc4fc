"""The HTTP service: one FastAPI app around one model, with bounded memory under load.

Endpoints:
    ``POST /v1/segment`` (multipart, the image in the field ``image``) -> the class-index PNG
        (``?format=png``, default; a palette PNG whose pixel values are class indices), per-class pixel
        fractions (``?format=json``) or a colour overlay PNG (``?format=overlay&alpha=0.5``);
        ``?crf=1`` refines with the fully connected CRF. PNG answers carry the fractions too, in the
        header ``X-Class-Fractions`` (comma-separated, one per class), so the web page needs one call.
    ``GET /v1/model`` -> model name, classes, palette, normalisation and the service limits.
    ``GET /healthz`` -> ``{"status": "ok", "queued": N}`` (requests admitted and not yet answered).
    ``GET /`` -> the single web page (``static/index.html``, read once at start-up).

Every answer that is not a success is a JSON body ``{"error": "<one line>"}``: 413 (upload too large,
too many pixels), 415 (not multipart, or not an image format the service decodes), 400 (a corrupt or
truncated image, a bad query, a malformed request), 408 (a request head or body not complete in time),
503 (queue full), 404, 405, and 500 for anything unexpected. The upload is judged by its bytes (the
decoder of `pixelwise.data.imageio`, the one the command line uses), never by its declared type.
Requests wait in a bounded queue for one inference worker thread, so memory holds at most
``max_queue`` uploads plus one image in flight. No part of a request is ever used as a path.
"""

from __future__ import annotations

import asyncio
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
import torch.nn as nn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pixelwise.crf import CRFParams
from pixelwise.data.imageio import FORMAT_NAMES, ImageFormatError, ImageTooLarge, decode_image
from pixelwise.errors import UserError
from pixelwise.palette import index_png_bytes, overlay
from pixelwise.precision import precision_name
from pixelwise.segment import (
    LARGE_KINDS,
    MAX_WHOLE_PIXELS,
    NeedsWholeImage,
    check_large,
    default_window,
    segment_image,
)
from pixelwise.weights import WeightsMeta

FORMATS = ("png", "json", "overlay")
log = logging.getLogger("pixelwise.serve")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may cost the service."""

    max_upload_bytes: int = 20 * 2**20  # request body; a 12 MP phone JPEG is ~5 MB, a 4K PNG screenshot ~15 MB
    max_pixels: int = 16_000_000  # ~4000 x 4000; checked from the header before decoding (decompression bombs)
    max_queue: int = 16  # requests admitted at once (waiting or running); more are answered 503, not buffered
    header_timeout: float = 10.0  # a request head must be complete this long after the connection is idle
    body_timeout: float = 60.0  # 20 MiB in 60 s is 350 kB/s: a slow phone link, not a client that trickles
    max_connections: int = 512  # open sockets; one more evicts the longest-idle one (see serve/protocol.py)
    max_whole_pixels: int = MAX_WHOLE_PIXELS  # larger images are slid: memory O(window height x band), not O(image)
    large: str = LARGE_KINDS[0]  # "downscale": larger images are inferred at max_whole_pixels, CRF allowed


class ApiError(Exception):
    """An HTTP error with a one-line message, answered as ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _BodyTooLarge(Exception):
    """Raised from `receive` once a request body passes the limit."""


class _BodyTooSlow(Exception):
    """Raised from `receive` when a request body is not complete by its deadline."""


class RequestLimits:
    """ASGI middleware: refuse a request body larger than `max_bytes` (413) or slower than `timeout` s (408).

    A declared ``Content-Length`` is checked up front; a chunked body is counted as it arrives. The
    deadline runs from the request head to the body's last byte, whatever pace the bytes come at.
    """

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = (
            413,
            f"request body is larger than the limit of {self.max_bytes} bytes; "
            "send a smaller image (downscale or recompress it)",
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _error_response(*too_large)(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        received = 0
        body_done = started = False

        async def limited_receive():
            nonlocal received, body_done
            if body_done:  # later calls wait for a disconnect, which has no deadline
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise _BodyTooSlow from None
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                body_done = not msg.get("more_body", False)
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return msg

        async def tracking_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (_BodyTooLarge, _BodyTooSlow) as e:
            if started:
                raise
            status, message = (
                too_large
                if isinstance(e, _BodyTooLarge)
                else (408, f"the request body was not complete within {self.timeout:g} s; send it faster or smaller")
            )
            await _error_response(status, message, {"Connection": "close"})(scope, receive, send)


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def decode_upload(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode an upload with the command line's decoder (`pixelwise.data.imageio`), as an `ApiError`:
    413 too many pixels (from the header, before decoding), 415 not an accepted format, 400 corrupt.

    Shape:
        returns (H, W, 3) uint8, EXIF orientation applied (as browsers show the image).
    """
    try:
        return decode_image(
            data, name="uploaded image", max_pixels=max_pixels, hint=f"send an intact {FORMAT_NAMES} file"
        )
    except ImageTooLarge as e:
        raise ApiError(413, f"{e.reason}; downscale it") from None
    except ImageFormatError as e:
        raise ApiError(415, f"{e.reason}; send a {FORMAT_NAMES} file") from None
    except UserError as e:
        raise ApiError(400, str(e)) from None


def encode_png(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def class_fractions(pred: np.ndarray, num_classes: int) -> list[float]:
    """Share of the pixels predicted as each class; sums to 1."""
    counts = np.zeros(num_classes, np.int64)
    for rows in np.array_split(pred, max(1, pred.size // 2**20)):  # bincount copies to int64: a band at a time
        counts += np.bincount(rows.ravel(), minlength=num_classes)[:num_classes]
    return (counts / max(pred.size, 1)).tolist()


class Segmenter:
    """Runs the model on one decoded image at a time (called from the single worker thread)."""

    def __init__(
        self,
        model: nn.Module,
        meta: WeightsMeta,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        crf: CRFParams | None = None,
        max_whole_pixels: int = MAX_WHOLE_PIXELS,
        large: str = LARGE_KINDS[0],
    ):
        """`crf`: the CRF of `?crf=1`; default the one recorded in the weights, else DeepLab's (VGG).
        `large`: how an image above `max_whole_pixels` is inferred (`pixelwise.segment.LARGE_KINDS`)."""
        from pixelwise.engine import InferenceSpec

        check_large(large)  # at start-up, not at the first large upload
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta
        if crf is None:
            crf = CRFParams.from_dict(meta.extra["crf"]) if "crf" in meta.extra else CRFParams.preset("deeplab_vgg")
        self.plain = InferenceSpec(dtype=dtype)  # whole-image inference, autocast dtype (None = fp32)
        self.refined = InferenceSpec(dtype=dtype, crf=crf)
        self.max_whole_pixels = max_whole_pixels
        self.large = large
        self.window = default_window(meta.extra)

    def __call__(self, image: np.ndarray, *, crf: bool = False) -> np.ndarray:
        """RGB uint8 ``(H, W, 3)`` -> class indices ``(H, W)``: whole-image inference up to `max_whole_pixels`,
        above it by sliding window one row of windows at a time or downscaled (`pixelwise.segment`), so memory
        stays bounded."""
        try:
            return segment_image(
                self.model,
                image,
                self.refined if crf else self.plain,
                mean=self.meta.mean,
                std=self.meta.std,
                num_classes=self.meta.num_classes,
                default_win=self.window,
                max_whole_pixels=self.max_whole_pixels,
                large=self.large,
                name="uploaded image",
            )
        except NeedsWholeImage as e:
            raise ApiError(413, e.message("send it downscaled (or serve with --large downscale)")) from None


# the page's scripts and styles are inline; it talks to this service only
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


def _check_request(request: Request, format: str, alpha: float) -> None:
    """ApiError 400/415 for a /v1/segment request whose query or Content-Type cannot be answered."""
    if format not in FORMATS:
        raise ApiError(400, f"format={format!r} is not supported; use png, json or overlay")
    if not 0.0 <= alpha <= 1.0:
        raise ApiError(400, f"alpha={alpha} is outside 0..1; give the overlay opacity, e.g. alpha=0.5")
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(
            415,
            f"Content-Type {content_type or '(none)'!r} is not supported; send "
            "multipart/form-data with the image in the field 'image'",
        )


def create_app(
    model: nn.Module,
    meta: WeightsMeta,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    limits: ServeLimits | None = None,
) -> FastAPI:
    """The service for one model and its weights metadata (see the module docstring for the API);
    `dtype` is the autocast dtype of inference (None = fp32)."""
    limits = limits or ServeLimits()
    segmenter = Segmenter(
        model, meta, device=device, dtype=dtype, max_whole_pixels=limits.max_whole_pixels, large=limits.large
    )
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixelwise-infer")
    page = resources.files("pixelwise.serve").joinpath("static/index.html").read_bytes()
    admitted = 0  # requests between admission and answer; the event loop is the only writer

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title="pixelwise", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/v1/openapi.json"
    )
    app.add_middleware(RequestLimits, max_bytes=limits.max_upload_bytes, timeout=limits.body_timeout)
    app.state.limits = limits
    app.state.meta = meta

    _add_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "queued": admitted}

    @app.get("/v1/model")
    async def model_info() -> dict:
        return _model_info(meta, segmenter, limits)

    @app.post("/v1/segment")
    async def segment(request: Request, format: str = "png", crf: bool = False, alpha: float = 0.5) -> Response:
        nonlocal admitted
        _check_request(request, format, alpha)
        if admitted >= limits.max_queue:
            raise ApiError(503, f"busy: {admitted} requests are queued (limit {limits.max_queue}); retry shortly")
        admitted += 1
        try:
            data = await _read_upload(request)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(worker, _answer, segmenter, data, format, crf, alpha, limits)
        finally:
            admitted -= 1

    return app


async def _read_upload(request: Request) -> bytes:
    """The bytes of the multipart field ``image``; its declared content type is not trusted: the bytes decide."""
    try:
        form = await request.form(max_files=1, max_fields=4)
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection before the upload was complete") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "no file in the multipart field 'image'; send the image as image=@FILE")
    data = await upload.read()
    await form.close()
    return data


def _add_error_handlers(app: FastAPI) -> None:
    """Every error the app raises becomes the one JSON shape, unexpected ones included (500)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error_response(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error_response(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _unexpected_error(request: Request, exc: Exception):
        # starlette logs the traceback after this answer; the client gets the one shape, without internals
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return _error_response(
            500,
            f"internal error ({type(exc).__name__}) while answering {request.method} "
            f"{request.url.path}; the server log has the details",
        )


def _model_info(meta: WeightsMeta, segmenter: Segmenter, limits: ServeLimits) -> dict:
    """The body of ``GET /v1/model``."""
    return {
        "model": meta.model_name,
        "model_kwargs": meta.model_kwargs,
        "num_classes": meta.num_classes,
        "classes": meta.classes,
        "palette": [list(c) for c in meta.palette],
        "mean": list(meta.mean),
        "std": list(meta.std),
        "device": str(segmenter.device),
        "precision": precision_name(segmenter.plain.dtype),
        "crf": segmenter.refined.crf.to_dict(),
        "limits": {
            "max_upload_bytes": limits.max_upload_bytes,
            "max_pixels": limits.max_pixels,
            "max_queue": limits.max_queue,
            "max_whole_pixels": limits.max_whole_pixels,
            "large": limits.large,
            "window": list(segmenter.window),
        },
    }


def _answer(segmenter: Segmenter, data: bytes, format: str, crf: bool, alpha: float, limits: ServeLimits) -> Response:
    """Decode, segment and encode one upload (runs in the worker thread, off the event loop)."""
    meta = segmenter.meta
    image = decode_upload(data, max_pixels=limits.max_pixels)
    pred = segmenter(image, crf=crf)
    fractions = class_fractions(pred, meta.num_classes)
    h, w = pred.shape
    if format == "json":
        return JSONResponse(
            {
                "width": w,
                "height": h,
                "model": meta.model_name,
                "crf": crf,
                "classes": [
                    {"index": i, "name": name, "color": list(meta.palette[i]), "fraction": fractions[i]}
                    for i, name in enumerate(meta.classes)
                ],
            }
        )
    headers = {"X-Class-Fractions": ",".join(f"{f:.6g}" for f in fractions), "Cache-Control": "no-store"}
    if format == "overlay":
        body = encode_png(overlay(image, pred, meta.palette, alpha=alpha, ignore_index=meta.ignore_index))
    else:
        body = index_png_bytes(pred, meta.palette, ignore_index=meta.ignore_index)
    return Response(body, media_type="image/png", headers=headers)
