"""``mltk serve``: an index directory as an HTTP service with a web page (``mltk.serve``)."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from mltk.cli.options import Device


def serve(
    index_dir: Annotated[Path, typer.Argument(help="Index directory written by `mltk index` (with --calibrate, searches say match / no match).")],
    host: Annotated[str, typer.Option(help="Address to listen on; any other than the loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    token: Annotated[Optional[str], typer.Option(envvar="MLTK_SERVE_TOKEN", show_envvar=True, help="Every request but the page's must send 'Authorization: Bearer TOKEN'.")] = None,
    max_bytes: Annotated[int, typer.Option(help="Largest uploaded image, in bytes.")] = 10 * 2**20,
    max_pixels: Annotated[int, typer.Option(help="Largest uploaded image, in pixels (width x height, read before decoding).")] = 40_000_000,
    max_batch: Annotated[int, typer.Option(help="Query images of concurrent requests embedded together, at most.")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="How long a query image waits for others to share its batch.")] = 5.0,
    engine: Annotated[str, typer.Option(help="What embeds the queries: torch, onnx (ONNX Runtime), or auto: ONNX Runtime where it agrees with PyTorch to 1e-5 and is faster.")] = "auto",
    device: Device = None,
) -> None:
    """Serve an index over HTTP: search, verify, embed, enrol and remove identities, with a web page at / and FastAPI's
    OpenAPI page at /docs. The model, index and calibration are loaded once."""
    from rich.markup import escape

    from mltk.cli.output import console
    from mltk.serve import ServeSettings, serve as run_server

    settings = ServeSettings(index_dir, host, port, token, max_bytes, max_pixels, max_batch=max_batch, max_wait_ms=max_wait_ms, engine=engine, device=device).check()
    def ready(url: str, engine) -> None:
        chosen = f"queries embedded by {engine.name}" + (f" ({engine.note})" if engine.note else "")
        if engine.timings_ms:
            chosen += f"; per batch of 1: torch {engine.timings_ms['torch']['batch1']} ms, onnxruntime {engine.timings_ms['onnxruntime']['batch1']} ms"
        console.print(escape(f"serving {index_dir} at {url} (Ctrl-C stops); {chosen}"), highlight=False, soft_wrap=True)

    run_server(settings, on_ready=ready)
