"""`pixelwise serve`: the HTTP service and web page for one weights file (FastAPI + uvicorn, extra `serve`)."""

from __future__ import annotations

import argparse
import errno
import socket
from typing import TYPE_CHECKING

from pixelwise.errors import UserError

if TYPE_CHECKING:
    import uvicorn


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port), or a UserError naming the address and the fix."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(
            f"--host {host!r}: cannot resolve it ({e.strerror}); use an address such as 127.0.0.1"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # allow restarts over TIME_WAIT, not a live port
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(
                f"--port {port}: address {host}:{port} is already in use; stop the other server "
                "or choose another port with --port"
            ) from None
        if e.errno == errno.EACCES:
            raise UserError(f"--port {port}: permission denied on {host}:{port}; use a port above 1023") from None
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(2048)  # connections made before uvicorn starts wait in the backlog instead of being refused
    return sock


def server_config(app) -> uvicorn.Config:
    """uvicorn settings for the service: connections watched by `ServeProtocol` (read deadlines, a cap
    that evicts idle sockets, JSON errors) instead of uvicorn's `limit_concurrency`, which counted idle
    sockets and answered everyone, health checks included, with a plain-text 503."""
    import uvicorn

    from pixelwise.serve.protocol import protocol_class

    limits = app.state.limits
    return uvicorn.Config(
        app,
        http=protocol_class(limits),
        ws="none",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
    )


def serve_command(args: argparse.Namespace) -> int:
    """`pixelwise serve --weights W.safetensors [--host H --port P --device D --large slide|downscale]`."""
    # OMP_WAIT_POLICY=PASSIVE is set by pixelwise.cli before torch loads: spinning OpenMP threads stole
    # the cores from decoding and encoding (a busy 2-core machine: 0.5 s instead of 14 ms a request).
    import uvicorn

    from pixelwise.inference import resolve_device, resolve_dtype
    from pixelwise.precision import precision_name
    from pixelwise.serve.app import ServeLimits, create_app
    from pixelwise.weights import load_weights

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is outside 0..65535; use e.g. --port 8000")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    model, meta = load_weights(args.weights, device=device)
    channels = int(meta.model_kwargs.get("in_channels", 3))
    if channels != 3:
        raise UserError(
            f"{args.weights}: the model takes {channels}-channel input but the service feeds RGB "
            "images; serve weights of a 3-channel model"
        )
    sock = bind_socket(args.host, args.port)  # before uvicorn, so a busy port is one clear line
    app = create_app(model, meta, device=device, dtype=dtype, limits=ServeLimits(large=args.large))
    host, port = sock.getsockname()[:2]
    print(
        f"pixelwise serve: {meta.model_name} ({meta.num_classes} classes) on http://{host}:{port}/ "
        f"(device {device}, {precision_name(dtype)}); Ctrl+C to stop",
        flush=True,
    )
    config = server_config(app)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
