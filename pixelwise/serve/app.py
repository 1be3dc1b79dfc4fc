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

Every error is a JSON body ``{"error": "<one line>"}``: 413 (upload too large, too many pixels), 415
(not multipart, or a part that is not an image), 400 (undecodable image, bad query), 503 (queue full).
Requests wait in a bounded queue for one inference worker thread, so memory holds at most
``max_queue`` uploads plus one image in flight. No part of a request is ever used as a path.
"""

from __future__ import annotations

import asyncio
import io
import warnings
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
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pixelwise.crf import CRFParams
from pixelwise.palette import index_png_bytes, overlay
from pixelwise.precision import precision_name
from pixelwise.weights import WeightsMeta

FORMATS = ("png", "json", "overlay")
# What browsers and curl send for the formats Pillow decodes here; anything else is answered 415.
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif", "image/tiff")
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # decoders Pillow may try: a small attack surface


@dataclass(frozen=True)
class ServeLimits:
    """What one request may cost the service."""

    max_upload_bytes: int = 20 * 2**20  # request body; a 12 MP phone JPEG is ~5 MB, a 4K PNG screenshot ~15 MB
    max_pixels: int = 16_000_000  # ~4000 x 4000; checked from the header before decoding (decompression bombs)
    max_queue: int = 16  # requests admitted at once (waiting or running); more are answered 503, not buffered


class ApiError(Exception):
    """An HTTP error with a one-line message, answered as ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _BodyTooLarge(Exception):
    """Raised from `receive` once a request body passes the limit."""


class BodySizeLimit:
    """ASGI middleware: refuse a request body larger than `max_bytes` with 413, before it is buffered.

    A declared ``Content-Length`` is checked up front; a chunked body is counted as it arrives.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = (f"request body is larger than the limit of {self.max_bytes} bytes; "
                   "send a smaller image (downscale or recompress it)")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _error_response(413, message)(scope, receive, send)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return msg

        async def tracking_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await _error_response(413, message)(scope, receive, send)


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode an uploaded image to RGB uint8 ``(H, W, 3)``, EXIF orientation applied (as browsers show it).

    The pixel count is read from the header and refused (`ApiError` 413) before any pixel is decoded.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have flipped it; a short file must fail
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ApiError(413, f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}; "
                                        "downscale it")
                im.load()  # decodes the first frame; a truncated file fails here
                try:
                    im = ImageOps.exif_transpose(im)
                except (OSError, ValueError, SyntaxError):
                    pass  # a broken EXIF block: keep the stored orientation rather than refuse the pixels
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the top 8 bits
                    a = np.asarray(im).astype(np.int64)
                    im = Image.fromarray(np.clip(a >> 8 if a.max() > 255 else a, 0, 255).astype(np.uint8))
                return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy shares it
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(413, f"image refused as a decompression bomb ({e}); downscale it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        detail = str(e).splitlines()[0][:150] if str(e) else type(e).__name__
        raise ApiError(400, f"cannot decode the uploaded image ({detail}); send a PNG, JPEG, WebP, BMP, GIF "
                            "or TIFF file") from None


def encode_png(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def class_fractions(pred: np.ndarray, num_classes: int) -> list[float]:
    """Share of the pixels predicted as each class; sums to 1."""
    counts = np.bincount(pred.ravel(), minlength=num_classes)[:num_classes]
    return (counts / max(pred.size, 1)).tolist()


class Segmenter:
    """Runs the model on one decoded image at a time (called from the single worker thread)."""

    def __init__(self, model: nn.Module, meta: WeightsMeta, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, crf: CRFParams | None = None):
        """`crf`: the CRF of `?crf=1`; default the one recorded in the weights, else DeepLab's (VGG)."""
        from pixelwise.engine import InferenceSpec

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta
        if crf is None:
            crf = CRFParams.from_dict(meta.extra["crf"]) if "crf" in meta.extra else CRFParams.preset("deeplab_vgg")
        self.plain = InferenceSpec(dtype=dtype)  # whole-image inference, autocast dtype (None = fp32)
        self.refined = InferenceSpec(dtype=dtype, crf=crf)

    def __call__(self, image: np.ndarray, *, crf: bool = False) -> np.ndarray:
        """RGB uint8 ``(H, W, 3)`` -> class indices int64 ``(H, W)``."""
        from pixelwise.engine import segment

        x = torch.from_numpy(image).permute(2, 0, 1)[None].to(self.device)  # (1, 3, H, W) uint8
        scores = segment(self.model, x, self.refined if crf else self.plain, mean=self.meta.mean, std=self.meta.std)
        return scores.argmax(1)[0].cpu().numpy()  # (H, W)


def create_app(model: nn.Module, meta: WeightsMeta, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, limits: ServeLimits | None = None) -> FastAPI:
    """The service for one model and its weights metadata (see the module docstring for the API);
    `dtype` is the autocast dtype of inference (None = fp32)."""
    limits = limits or ServeLimits()
    segmenter = Segmenter(model, meta, device=device, dtype=dtype)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixelwise-infer")
    page = resources.files("pixelwise.serve").joinpath("static/index.html").read_bytes()
    admitted = 0  # requests between admission and answer; the event loop is the only writer

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="pixelwise", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/v1/openapi.json")
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_upload_bytes)
    app.state.limits = limits
    app.state.meta = meta

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

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        csp = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
               "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'")
        return HTMLResponse(page, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "queued": admitted}

    @app.get("/v1/model")
    async def model_info() -> dict:
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
            "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels,
                       "max_queue": limits.max_queue},
        }

    @app.post("/v1/segment")
    async def segment(request: Request, format: str = "png", crf: bool = False, alpha: float = 0.5) -> Response:
        nonlocal admitted
        if format not in FORMATS:
            raise ApiError(400, f"format={format!r} is not supported; use png, json or overlay")
        if not 0.0 <= alpha <= 1.0:
            raise ApiError(400, f"alpha={alpha} is outside 0..1; give the overlay opacity, e.g. alpha=0.5")
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise ApiError(415, f"Content-Type {content_type or '(none)'!r} is not supported; send "
                                "multipart/form-data with the image in the field 'image'")
        if admitted >= limits.max_queue:
            raise ApiError(503, f"busy: {admitted} requests are queued (limit {limits.max_queue}); retry shortly")
        admitted += 1
        try:
            form = await request.form(max_files=1, max_fields=4)
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "no file in the multipart field 'image'; send the image as image=@FILE")
            part_type = (upload.content_type or "").split(";")[0].strip().lower()
            if part_type not in IMAGE_TYPES:
                raise ApiError(415, f"the uploaded part has type {part_type or '(none)'!r}; send an image "
                                    f"({', '.join(IMAGE_TYPES)})")
            data = await upload.read()
            await form.close()
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(worker, _answer, segmenter, data, format, crf, alpha, limits)
        finally:
            admitted -= 1

    return app


def _answer(segmenter: Segmenter, data: bytes, format: str, crf: bool, alpha: float,
            limits: ServeLimits) -> Response:
    """Decode, segment and encode one upload (runs in the worker thread, off the event loop)."""
    meta = segmenter.meta
    image = decode_image(data, max_pixels=limits.max_pixels)
    pred = segmenter(image, crf=crf)
    fractions = class_fractions(pred, meta.num_classes)
    h, w = pred.shape
    if format == "json":
        return JSONResponse({
            "width": w, "height": h, "model": meta.model_name, "crf": crf,
            "classes": [{"index": i, "name": name, "color": list(meta.palette[i]), "fraction": fractions[i]}
                        for i, name in enumerate(meta.classes)],
        })
    headers = {"X-Class-Fractions": ",".join(f"{f:.6g}" for f in fractions), "Cache-Control": "no-store"}
    if format == "overlay":
        body = encode_png(overlay(image, pred, meta.palette, alpha=alpha, ignore_index=meta.ignore_index))
    else:
        body = index_png_bytes(pred, meta.palette, ignore_index=meta.ignore_index)
    return Response(body, media_type="image/png", headers=headers)
