"""The HTTP service: every answer format checked against hand-computed pixels, every error code with its
JSON body, the bounded queue, path safety, the CLI's one-line errors and a loopback load test."""

from __future__ import annotations

import contextlib
import io
import json
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402

from pixelwise.serve.app import ServeLimits, create_app  # noqa: E402
from pixelwise.weights import WeightsMeta  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class RedVsGreen(nn.Module):
    """Class 1 ("red") where the red channel exceeds the green one, else class 0 ("green")."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 1] = 1.0  # logit 0 = green
            self.conv.weight[1, 0] = 1.0  # logit 1 = red

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, 2, H, W)


RG_META = WeightsMeta(
    model_name="red_vs_green",
    model_kwargs={},
    classes=["green", "red"],
    palette=[(0, 255, 0), (255, 0, 0)],
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
)


def rg_image(h: int = 6, w: int = 8, red_cols: int = 3) -> np.ndarray:
    """Left `red_cols` columns reddish, the rest greenish; not pure colours, so blends are informative."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :red_cols] = (200, 10, 30)
    img[:, red_cols:] = (20, 180, 60)
    return img


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny IDAT: what a decompression bomb looks like up front."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def upload(data: bytes, *, name: str = "x.png", kind: str = "image/png") -> dict:
    return {"image": (name, data, kind)}


@pytest.fixture
def client():
    with TestClient(create_app(RedVsGreen(), RG_META)) as c:
        yield c


def test_png_answer_is_class_index_palette_png(client):
    r = client.post("/v1/segment", files=upload(png_bytes(rg_image())))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    mask = Image.open(io.BytesIO(r.content))
    assert mask.mode == "P" and mask.size == (8, 6)
    expected = np.zeros((6, 8), np.uint8)
    expected[:, :3] = 1
    np.testing.assert_array_equal(np.asarray(mask), expected)
    assert mask.getpalette()[:6] == [0, 255, 0, 255, 0, 0]
    assert [float(v) for v in r.headers["x-class-fractions"].split(",")] == [5 / 8, 3 / 8]


def test_json_answer_has_per_class_fractions(client):
    r = client.post("/v1/segment?format=json", files=upload(png_bytes(rg_image(h=4, w=10, red_cols=1))))
    assert r.status_code == 200
    body = r.json()
    assert (body["width"], body["height"], body["model"], body["crf"]) == (10, 4, "red_vs_green", False)
    assert body["classes"] == [
        {"index": 0, "name": "green", "color": [0, 255, 0], "fraction": 0.9},
        {"index": 1, "name": "red", "color": [255, 0, 0], "fraction": 0.1},
    ]


def test_overlay_blends_class_colour_over_image(client):
    r = client.post("/v1/segment?format=overlay&alpha=0.25", files=upload(png_bytes(rg_image())))
    assert r.status_code == 200
    out = np.asarray(Image.open(io.BytesIO(r.content)))
    assert out.shape == (6, 8, 3)
    # 0.75 * (200, 10, 30) + 0.25 * (255, 0, 0) = (213.75, 7.5, 22.5) -> rounded half to even
    np.testing.assert_array_equal(out[0, 0], [214, 8, 22])
    # 0.75 * (20, 180, 60) + 0.25 * (0, 255, 0) = (15, 198.75, 45)
    np.testing.assert_array_equal(out[5, 7], [15, 199, 45])


def test_jpeg_and_exif_orientation(client):
    img = rg_image(h=4, w=6, red_cols=2)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(img).save(buf, format="JPEG", quality=95, exif=exif)
    r = client.post("/v1/segment", files=upload(buf.getvalue(), name="x.jpg", kind="image/jpeg"))
    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    assert mask.shape == (6, 4)  # as a browser shows it: rotated
    np.testing.assert_array_equal(mask, np.rot90(img[..., 0] > img[..., 1], k=-1).astype(np.uint8))


def test_model_health_and_page(client):
    info = client.get("/v1/model").json()
    assert info["model"] == "red_vs_green" and info["classes"] == ["green", "red"]
    assert info["palette"] == [[0, 255, 0], [255, 0, 0]] and info["num_classes"] == 2
    assert info["limits"]["max_pixels"] == ServeLimits().max_pixels
    assert info["limits"]["large"] == "slide"  # images above max_whole_pixels are slid unless served otherwise
    assert info["precision"] == "fp32"  # create_app's default; `pixelwise serve` resolves --precision auto
    assert client.get("/healthz").json() == {"status": "ok", "queued": 0}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="legend"' in page.text and "v1/segment" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]


def _assert_error(r, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    message = r.json()["error"]
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_upload_too_large_is_413():
    app = create_app(RedVsGreen(), RG_META, limits=ServeLimits(max_upload_bytes=2000))
    with TestClient(app) as c:
        big = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)  # ~4.8 kB PNG
        _assert_error(c.post("/v1/segment", files=upload(png_bytes(big))), 413, "2000 bytes")

        def chunks():  # no Content-Length: counted as it arrives
            yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            yield b"Content-Type: image/png\r\n\r\n"
            for _ in range(10):
                yield b"\0" * 500

        r = c.post("/v1/segment", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        _assert_error(r, 413, "2000 bytes")
        assert c.post("/v1/segment", files=upload(png_bytes(rg_image()))).status_code == 200


def test_too_many_pixels_and_bombs_are_413_before_decoding(client):
    # 5000 x 4000 = 20 MP: over the 16 MP default, under Pillow's own bomb limit -> our header check
    _assert_error(client.post("/v1/segment", files=upload(png_header_only(5000, 4000))), 413, "5000x4000", "16000000")
    # 40000 x 40000: Pillow refuses it at open
    _assert_error(client.post("/v1/segment", files=upload(png_header_only(40000, 40000))), 413)


def test_crf_above_the_whole_image_limit_is_413_when_sliding_and_runs_downscaled_on_request():
    """`--large downscale` lets `?crf=1` run on an image above `max_whole_pixels`, at that size."""
    from pixelwise.crf import CRFParams
    from pixelwise.engine import InferenceSpec
    from pixelwise.segment import segment_image

    img = rg_image(h=12, w=16, red_cols=6)  # 192 pixels, above the 100 of the limit
    with TestClient(create_app(RedVsGreen(), RG_META, limits=ServeLimits(max_whole_pixels=100))) as c:
        r = c.post("/v1/segment?crf=1", files=upload(png_bytes(img)))
        _assert_error(r, 413, "16x12 = 192 pixels", "dense CRF", "send it downscaled (or serve with --large downscale)")
    limits = ServeLimits(max_whole_pixels=100, large="downscale")
    with TestClient(create_app(RedVsGreen(), RG_META, limits=limits)) as c:
        assert c.get("/v1/model").json()["limits"]["large"] == "downscale"
        r = c.post("/v1/segment?crf=1", files=upload(png_bytes(img)))
        assert r.status_code == 200, r.text
    spec = InferenceSpec(crf=CRFParams.preset("deeplab_vgg"))  # the service's CRF for weights that record none
    expected = segment_image(
        RedVsGreen(),
        img,
        spec,
        mean=RG_META.mean,
        std=RG_META.std,
        num_classes=2,
        max_whole_pixels=100,
        large="downscale",
    )
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected)  # full size: 12 x 16


def test_wrong_content_types_are_415(client):
    data = png_bytes(rg_image())
    _assert_error(
        client.post("/v1/segment", content=data, headers={"content-type": "image/png"}), 415, "multipart/form-data"
    )
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    _assert_error(client.post("/v1/segment", files=upload(eps, kind="image/png")), 415, "it is EPS", "not supported")
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    _assert_error(client.post("/v1/segment", files=upload(svg, kind="image/gif")), 415, "not recognised")
    _assert_error(client.post("/v1/segment", files=upload(b"not an image at all")), 415, "not recognised")


@pytest.mark.parametrize("kind", ["application/octet-stream", "text/plain", ""])
def test_upload_is_judged_by_its_bytes_not_its_declared_type(client, kind):
    """`requests.post(url, files={"image": open("x.png", "rb")})` and `curl -F image=@x.webp` send
    application/octet-stream: they were refused with 415 although the bytes were a good image."""
    img = rg_image()
    for fmt, name in (("PNG", "x.png"), ("WEBP", "x.webp"), ("GIF", "x.gif")):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        r = client.post(
            "/v1/segment", files={"image": (name, buf.getvalue(), kind)} if kind else {"image": (name, buf.getvalue())}
        )
        assert r.status_code == 200, (fmt, kind, r.text)
        assert np.asarray(Image.open(io.BytesIO(r.content))).tolist() == (img[..., 0] > img[..., 1]).tolist()


def test_undecodable_or_incomplete_requests_are_400(client):
    truncated = png_bytes(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))[:3000]
    _assert_error(client.post("/v1/segment", files=upload(truncated)), 400, "corrupt or truncated")
    _assert_error(client.post("/v1/segment", files={"photo": ("x.png", b"x", "image/png")}), 400, "'image'")
    _assert_error(client.post("/v1/segment?format=tiff", files=upload(b"x")), 400, "format='tiff'")
    _assert_error(client.post("/v1/segment?alpha=2", files=upload(b"x")), 400, "alpha")
    _assert_error(client.post("/v1/segment?crf=maybe", files=upload(b"x")), 400, "crf")


class Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a bug deep inside the model\nwith a second line")


def test_unexpected_errors_are_json_500_without_internals():
    with TestClient(create_app(Broken(), RG_META), raise_server_exceptions=False) as c:
        r = c.post("/v1/segment", files=upload(png_bytes(rg_image())))
        _assert_error(r, 500, "internal error (RuntimeError)", "POST /v1/segment", "server log")
        assert "deep inside" not in r.text
        _assert_error(c.put("/healthz"), 405, "Method Not Allowed")
        assert c.get("/healthz").status_code == 200  # the service answers on


def test_no_request_path_reaches_the_filesystem(client, tmp_path):
    for path in (
        "/../../etc/passwd",
        "/static/../../pixelwise/weights.py",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/static/index.html",
        "/index.html",
        "/..%2f..%2fetc%2fpasswd",
    ):
        r = client.get(path)
        assert r.status_code == 404 and "error" in r.json(), path
    target = tmp_path / f"evil-{uuid.uuid4().hex}.png"
    r = client.post("/v1/segment", files=upload(png_bytes(rg_image()), name=f"../../../../..{target}"))
    assert r.status_code == 200 and not target.exists()


class Gate(nn.Module):
    """Blocks inside forward until released, so a test can hold the single worker busy."""

    def __init__(self):
        super().__init__()
        self.inner = RedVsGreen()
        self.entered = threading.Event()
        self.release = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        assert self.release.wait(30)
        return self.inner(x)


def test_queue_is_bounded_and_503_when_full():
    gate = Gate()
    with TestClient(create_app(gate, RG_META, limits=ServeLimits(max_queue=2))) as c, ThreadPoolExecutor(2) as pool:
        data = png_bytes(rg_image())
        first = pool.submit(c.post, "/v1/segment", files=upload(data))
        assert gate.entered.wait(30)
        second = pool.submit(c.post, "/v1/segment", files=upload(data))  # waits for the worker
        deadline = time.monotonic() + 30
        while c.get("/healthz").json()["queued"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        _assert_error(c.post("/v1/segment", files=upload(data)), 503, "limit 2")
        gate.release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert c.post("/v1/segment", files=upload(data)).status_code == 200  # the queue drained


# ---- the real service: weights file, CLI, uvicorn on loopback ------------------------------------------

UNET_KWARGS = {"padding": "same", "base_channels": 4, "depth": 2}


@pytest.fixture(scope="module")
def unet_weights(tmp_path_factory) -> Path:
    from pixelwise.models import get_model
    from pixelwise.weights import save_weights

    torch.manual_seed(0)
    model = get_model("unet", num_classes=3, **UNET_KWARGS)
    path = tmp_path_factory.mktemp("weights") / "unet.safetensors"
    save_weights(path, model, model_name="unet", model_kwargs=UNET_KWARGS, classes=["bg", "cat", "dog"])
    return path


def expected_mask(weights: Path, img: np.ndarray) -> np.ndarray:
    """What the service must answer: the weights' model on the image, computed here."""
    from pixelwise.inference import normalize, predict_logits
    from pixelwise.weights import load_weights

    model, meta = load_weights(weights)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    return predict_logits(model, normalize(x, meta.mean, meta.std)).argmax(1)[0].numpy()


def test_weights_file_app_and_crf(unet_weights):
    from pixelwise.crf import crf_kwargs, dense_crf
    from pixelwise.inference import normalize, predict_logits
    from pixelwise.weights import load_weights

    model, meta = load_weights(unet_weights)
    img = np.random.default_rng(3).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    with TestClient(create_app(model, meta)) as c:
        assert c.get("/v1/model").json()["classes"] == ["bg", "cat", "dog"]
        plain = np.asarray(Image.open(io.BytesIO(c.post("/v1/segment", files=upload(png_bytes(img))).content)))
        np.testing.assert_array_equal(plain, expected_mask(unet_weights, img))
        r = c.post("/v1/segment?crf=1&format=json", files=upload(png_bytes(img)))
        assert r.status_code == 200 and r.json()["crf"] is True
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    probs = predict_logits(model, normalize(x, meta.mean, meta.std)).softmax(1)
    refined = dense_crf(probs, x, **crf_kwargs("deeplab_vgg")).argmax(1)[0].numpy()
    counts = np.bincount(refined.ravel(), minlength=3) / refined.size
    assert [c["fraction"] for c in r.json()["classes"]] == pytest.approx(counts.tolist(), abs=1e-9)


def test_cli_port_in_use_and_unreadable_weights_are_one_line_errors(unet_weights, tmp_path, capsys):
    from pixelwise.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--weights", str(unet_weights), "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--port {port}" in err and "already in use" in err

    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    for weights, words in ((garbage, "not a readable .safetensors"), (tmp_path / "none.safetensors", "no such file")):
        assert main(["serve", "--weights", str(weights), "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and str(weights) in err


def test_cli_large_reaches_the_service(unet_weights, monkeypatch):
    import uvicorn

    from pixelwise.cli import main

    served = []

    def run(self, sockets):  # instead of serving: record the app's limits and let go of the port
        served.append(self.config.app.state.limits)
        for sock in sockets:
            sock.close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    argv = ["serve", "--weights", str(unet_weights), "--port", "0", "--device", "cpu"]
    assert main([*argv, "--large", "downscale"]) == 0 and main(argv) == 0
    assert [limits.large for limits in served] == ["downscale", "slide"]


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.mark.slow
def test_load_200_requests_from_8_clients(unet_weights):
    """`pixelwise serve` in a subprocess on a free loopback port: 200 uploads from 8 concurrent clients,
    every answer checked pixel by pixel; the server's peak RSS is printed."""
    import httpx

    images = [np.random.default_rng(i).integers(0, 256, (96, 128, 3), dtype=np.uint8) for i in range(4)]
    bodies = [png_bytes(img) for img in images]
    expected = [expected_mask(unet_weights, img) for img in images]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pixelwise",
            "serve",
            "--weights",
            str(unet_weights),
            "--port",
            "0",
            "--device",
            "cpu",
            "--precision",
            "fp32",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = re.search(r"http://[\d.]+:\d+/", proc.stdout.readline()).group(0)
        rss_start = _rss_kib(proc.pid, "VmRSS")

        def client(worker: int) -> list[bool]:
            ok = []
            with httpx.Client(base_url=url, timeout=60) as http:
                for j in range(25):
                    k = (worker + j) % len(bodies)
                    r = http.post("v1/segment", files={"image": (f"{k}.png", bodies[k], "image/png")})
                    mask = np.asarray(Image.open(io.BytesIO(r.content))) if r.status_code == 200 else None
                    ok.append(mask is not None and np.array_equal(mask, expected[k]))
            return ok

        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            results = [ok for oks in pool.map(client, range(8)) for ok in oks]
        elapsed = time.perf_counter() - start
        assert len(results) == 200 and all(results), f"{results.count(False)} wrong answers"
        peak = _rss_kib(proc.pid, "VmHWM")
        print(
            f"\nload test: 200 requests (96x128 PNG, unet) from 8 clients in {elapsed:.1f} s "
            f"({200 / elapsed:.0f} req/s); server RSS {rss_start / 1024:.0f} MiB at start, "
            f"peak {peak / 1024:.0f} MiB"
        )
        assert peak < rss_start + 512 * 1024  # bounded: the queue holds at most 16 small uploads
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_cli_precision_bf16_is_refused_where_emulated(unet_weights, monkeypatch, capsys):
    import pixelwise.precision
    from pixelwise.cli import main

    monkeypatch.setattr(pixelwise.precision, "cpu_has_native_bf16", lambda: False)
    assert main(["serve", "--weights", str(unet_weights), "--port", "0", "--device", "cpu", "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--precision bf16" in err and "use fp32 or auto" in err


# ---- connections: uvicorn in a thread with the service's protocol, raw sockets ---------------------------


@contextlib.contextmanager
def running_server(app):
    """The app behind uvicorn with `pixelwise serve`'s settings, on a free loopback port, in a thread."""
    import uvicorn

    from pixelwise.serve import bind_socket, server_config

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(server_config(app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(30)


def raw_exchange(address, data: bytes, *, timeout: float = 10) -> tuple[int, dict[str, str], bytes, float]:
    """Send `data` on a new connection and read until the server closes it: status, headers, body, seconds."""
    start = time.monotonic()
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body, time.monotonic() - start


def _json_error(status: int, headers: dict, body: bytes, expected: int, *words: str) -> None:
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    message = json.loads(body)["error"]
    assert "\n" not in message and all(w in message for w in words), message


def get_healthz(address) -> int:
    status, _, body, _ = raw_exchange(address, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status != 200 or json.loads(body)["status"] == "ok"
    return status


def test_idle_and_half_sent_connections_do_not_stall_the_service():
    """64 idle sockets once made every request a 503 (uvicorn's limit_concurrency counts connections) for
    as long as they stayed open; half-sent heads had no deadline at all."""
    limits = ServeLimits(header_timeout=1.0, max_connections=100)
    with running_server(create_app(RedVsGreen(), RG_META, limits=limits)) as address:
        idle = [socket.create_connection(address) for _ in range(80)]
        half = [socket.create_connection(address) for _ in range(10)]
        try:
            for s in half:
                s.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Le")
            assert get_healthz(address) == 200  # at once, beside 90 stalled sockets
            r = raw_exchange(address, b"GET /v1/model HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert r[0] == 200
            time.sleep(1.5)  # past the header deadline: idle sockets are closed, half-sent heads get 408
            for s in idle:
                s.settimeout(5)
                assert s.recv(100) == b""
            for s in half:
                s.settimeout(5)
                head, _, body = s.recv(4096).partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 408 ") and b"application/json" in head
                assert "not complete within 1 s" in json.loads(body)["error"]
        finally:
            for s in idle + half:
                s.close()


def test_trickled_head_gains_nothing_and_a_slow_body_is_408():
    limits = ServeLimits(header_timeout=1.0, body_timeout=1.0)
    with running_server(create_app(RedVsGreen(), RG_META, limits=limits)) as address:
        start = time.monotonic()
        with socket.create_connection(address, timeout=10) as s:
            for c in b"GET /healthz HTTP/1.1\r\nHost: x\r\n" * 4:  # a byte every 0.1 s: never idle, never done
                if select.select([s], [], [], 0.1)[0]:  # the server has answered: stop trickling
                    break
                s.sendall(bytes([c]))
            assert s.recv(4096).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - start < 5  # the deadline was 1 s after the first byte, not after the last
        body = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
        head = (
            b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 10000\r\n\r\n"
        )
        status, headers, answer, seconds = raw_exchange(address, head + body)  # and then nothing more
        _json_error(status, headers, answer, 408, "request body was not complete within 1 s")
        assert 0.9 < seconds < 5
        assert get_healthz(address) == 200


def test_a_flood_of_idle_sockets_evicts_the_oldest_not_the_health_check():
    limits = ServeLimits(header_timeout=30.0, max_connections=20)
    with running_server(create_app(RedVsGreen(), RG_META, limits=limits)) as address:
        idle = [socket.create_connection(address) for _ in range(40)]
        try:
            time.sleep(0.2)
            assert get_healthz(address) == 200
            time.sleep(0.3)
            readable = select.select(idle, [], [], 0)[0]  # a closed socket reads as end-of-file at once
            # the oldest were evicted: at most max_connections stay open
            assert sum(s.recv(10) == b"" for s in readable) >= 20
        finally:
            for s in idle:
                s.close()


def test_uvicorn_level_errors_are_json():
    with running_server(create_app(RedVsGreen(), RG_META)) as address:
        _json_error(*raw_exchange(address, b"NOT HTTP AT ALL\r\n\r\n")[:3], 400, "malformed HTTP request")
        _json_error(
            *raw_exchange(address, b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")[:3],
            400,
            "malformed HTTP request",
        )
        _json_error(
            *raw_exchange(address, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[:3], 404, "Not Found"
        )


# ---- memory: the largest accepted image ----------------------------------------------------------------

PEAK_SCRIPT = r"""
import io, json, sys, time
import numpy as np, torch, torch.nn as nn
from PIL import Image
from fastapi.testclient import TestClient
from pixelwise.serve.app import ServeLimits, create_app
from pixelwise.weights import WeightsMeta

class Wide(nn.Module):  # 16 float32 activations per pixel: 1 GiB for a 16 MP image inferred whole
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 2, 1))
    def forward(self, x):
        return self.net(x)

def peak_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) / 1024

torch.manual_seed(0)
data = open(sys.argv[1], "rb").read()
meta = WeightsMeta(model_name="wide", model_kwargs={}, classes=["a", "b"], palette=[(0, 0, 0), (255, 0, 0)])
with TestClient(create_app(Wide(), meta, limits=ServeLimits())) as c:
    warm = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(warm, format="PNG")
    assert c.post("/v1/segment", files={"image": ("w.png", warm.getvalue())}).status_code == 200
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak-RSS count here
    base, start = peak_mib(), time.perf_counter()
    r = c.post("/v1/segment?format=json", files={"image": ("big.png", data)})
    seconds, peak = time.perf_counter() - start, peak_mib()
print(json.dumps({"status": r.status_code, "body": r.json(), "base_mib": base, "peak_mib": peak, "seconds": seconds}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak RSS")
def test_peak_memory_for_the_largest_accepted_image_is_bounded(tmp_path):
    """A 4000x4000 PNG (exactly max_pixels) drove the service to 7.2 GB: it was inferred whole. Sliding
    windows keep the growth to a few hundred MiB for a model that needs ~2.5 GiB whole."""
    block = np.zeros((128, 128, 3), np.uint8)
    block[:64, :, 0], block[:, :64, 1], block[..., 2] = 200, 200, 50
    side = int(ServeLimits().max_pixels ** 0.5)
    assert side * side == ServeLimits().max_pixels
    path = tmp_path / "largest.png"
    Image.fromarray(np.tile(block, (32, 32, 1))[:side, :side]).save(path)  # 57 kB of PNG
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["status"] == 200 and (result["body"]["width"], result["body"]["height"]) == (side, side)
    growth = result["peak_mib"] - result["base_mib"]
    print(
        f"\nlargest accepted image {side}x{side}: peak RSS +{growth:.0f} MiB over {result['base_mib']:.0f} MiB, "
        f"{result['seconds']:.1f} s"
    )
    assert growth < 600
