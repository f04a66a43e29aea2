"""``mltk serve``: an index directory as an HTTP service (FastAPI on uvicorn), and the web page that uses it.

The model, the index and its calibration are loaded once. Query images from concurrent requests are embedded together
(``Batcher``: small batches, a bounded wait). Searches read the gallery as it is (``Gallery.now``, one whole version);
enrolments and removals are ``mltk.index_edits``' edits, one at a time, then the new version is read back, so
``mltk search`` on the directory answers what the server answers.

Security: uploads are bounded in bytes and in pixels (the size is read from the header before anything is decoded),
only image types are decoded, no path from a request is ever opened (gallery images are served by row number), a
bearer token guards every route but the page, /health and the API description when one is set, and CORS stays off. Errors are JSON,
``{"error": "one plain message"}``, with their status; never a traceback.
"""


import io
import ipaddress
import queue
import tempfile
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from mltk.errors import MltkError, UsageError, first_line

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")  # the decoders an upload may reach
TOKEN_ENV = "MLTK_SERVE_TOKEN"
ENGINES = ("auto", "torch", "onnx")
AGREEMENT = 1e-5  # largest difference from PyTorch's embeddings at which ONNX Runtime may serve them


@dataclass(frozen=True)
class ServeSettings:
    """What ``mltk serve`` is asked for, checked once (``check``) before anything loads."""

    index: Path
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_bytes: int = 10 * 2**20  # one uploaded image
    max_pixels: int = 40_000_000  # width x height, read from the header before decoding
    max_images: int = 32  # per /enrol
    max_batch: int = 16  # query images embedded together
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for company
    engine: str = "auto"  # what embeds the queries: torch, onnx, or auto (the faster of the two that agree, ``choose_engine``)
    device: str | None = None

    def check(self) -> "ServeSettings":
        if not is_loopback(self.host) and not self.token:
            raise UsageError(
                f"--host {self.host} lets other machines in: give --token SECRET (or set {TOKEN_ENV}), which every request "
                "must then send as 'Authorization: Bearer SECRET'"
            )
        for name, value, least in (("--port", self.port, 0), ("--max-bytes", self.max_bytes, 1), ("--max-pixels", self.max_pixels, 1),
                                   ("--max-batch", self.max_batch, 1), ("--max-images", self.max_images, 1)):
            if value < least or (name == "--port" and value > 65535):
                raise UsageError(f"{name} {value} is out of range")
        if not 0 <= self.max_wait_ms <= 1000:
            raise UsageError(f"--max-wait-ms {self.max_wait_ms} is out of range (0 to 1000)")
        if self.engine not in ENGINES:
            raise UsageError(f"unknown --engine {self.engine!r}; choose {', '.join(ENGINES)}")
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost may resolve to anything
        return False


class Refused(Exception):
    """A request mltk will not serve: its HTTP status and one plain message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def decode_upload(data: bytes, max_bytes: int, max_pixels: int, what: str = "the upload"):
    """An uploaded image as a PIL image: too many bytes or pixels is 413 (pixels judged from the header, before
    decoding), not an image of ``FORMATS`` is 415, a broken one 400."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > max_bytes:
        raise Refused(413, f"{what} is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise Refused(400, f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is the server's
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise Refused(415, f"{what} is not an image of a type mltk decodes ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as exc:  # PIL's own refusal, from the header, at twice its limit
        raise Refused(413, f"{what} has more pixels than the limit of {max_pixels} ({first_line(exc)})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise Refused(413, f"{what} is {width} x {height} pixels; the limit is {max_pixels} pixels")
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise Refused(400, f"{what} cannot be decoded ({first_line(exc)})") from None
    return image


class Batcher:
    """Embeds images from many requests together: a request adds its preprocessed image and waits; one thread takes
    what is queued (up to ``max_batch``) and embeds it as one batch. It waits up to ``max_wait_ms`` for more only while
    other requests are on their way (``coming``: announced, still being decoded), so a lone request never waits."""

    def __init__(self, embed_batch, max_batch: int = 16, max_wait_ms: float = 5.0):
        self.embed_batch, self.max_batch, self.max_wait = embed_batch, max_batch, max_wait_ms / 1000
        self.queue: queue.Queue = queue.Queue()
        self.batches = 0
        self.coming = 0  # requests that will submit an image soon (``announce``)
        self._count = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="mltk-batcher", daemon=True)
        self.thread.start()

    def announce(self, n: int = 1) -> None:
        """``n`` images are on their way (their requests are decoding them); ``submit`` or ``withdraw`` each."""
        with self._count:
            self.coming += n

    def withdraw(self, n: int = 1) -> None:
        with self._count:
            self.coming -= n

    def submit(self, tensor) -> Future:
        future: Future = Future()
        self.queue.put((tensor, future))
        self.withdraw()
        return future

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        import torch

        while True:
            first = self.queue.get()
            if first is None:
                return
            items, deadline = [first], time.monotonic() + self.max_wait
            while len(items) < self.max_batch:
                if self.coming <= 0 and self.queue.empty():
                    break  # nobody else is on the way: no reason to wait
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)  # stop after this batch
                    break
                items.append(item)
            try:
                vectors = self.embed_batch(torch.stack([tensor for tensor, _ in items]))
                self.batches += 1
                for (_, future), vector in zip(items, vectors):
                    future.set_result(vector)
            except Exception as exc:  # noqa: BLE001  each waiting request gets the error
                for _, future in items:
                    future.set_exception(exc)


class Gallery:
    """The index being served: ``now`` is one whole version (an ``IndexDir`` and its operating point), replaced after each
    edit; edits are serialised."""

    def __init__(self, path: Path, model, device: str | None = None):
        from mltk.index import load_model, open_index_dir, operating_point

        self.path, self.model = path, model
        opened = open_index_dir(path)
        if model is None:
            self.model = load_model(opened, device)
        self.now = (opened, operating_point(opened, None))
        self.edits = threading.Lock()

    def reload(self) -> None:
        from mltk.index import open_index_dir, operating_point

        opened = open_index_dir(self.path)
        self.now = (opened, operating_point(opened, None))


def embedder_of(model):
    """``model``'s forward for a preprocessed batch, as ``mltk.embedding`` runs it: float32, L2-normalised, to numpy."""
    import torch

    from mltk.embedding import embed_batch

    def embed(batch):
        with torch.inference_mode():
            return embed_batch(model.embedder, batch.to(model.device)).cpu().numpy()

    return embed


@dataclass
class Engine:
    """What embeds the query images: its name, its forward (a preprocessed batch to numpy vectors), and how it was
    chosen (ONNX Runtime's largest difference from PyTorch on gallery images, each one's time per batch)."""

    name: str
    embed_batch: object
    agreement: float | None = None
    timings_ms: dict | None = None
    note: str = ""

    def describe(self) -> dict:
        return {"name": self.name, "agreement": self.agreement, "timings_ms": self.timings_ms, "note": self.note}


def choose_engine(model, wanted: str, probe) -> Engine:
    """``wanted``: torch (eager PyTorch), onnx (the model exported to ONNX, run by ONNX Runtime), or auto: onnx when it
    agrees with PyTorch to ``AGREEMENT`` on ``probe`` (a preprocessed batch of gallery images) and is faster on it (batches
    of 1 and of 8, best of 5), else torch. On a GPU, auto is torch."""
    torch_engine = Engine("torch", embedder_of(model))
    if wanted == "torch" or (wanted == "auto" and model.device.type != "cpu"):
        return torch_engine
    try:
        run = onnx_embedder(model, probe)
    except MltkError as exc:
        if wanted == "onnx":
            raise
        torch_engine.note = f"ONNX Runtime not used: {first_line(exc)}"
        return torch_engine
    expected = torch_engine.embed_batch(probe)
    agreement = float(np.abs(run(probe) - expected).max())
    timings = {"torch": _time(torch_engine.embed_batch, probe), "onnxruntime": _time(run, probe)}
    if wanted == "onnx":
        return Engine("onnxruntime", run, agreement, timings)
    if agreement > AGREEMENT:
        return Engine("torch", torch_engine.embed_batch, agreement, timings, f"ONNX Runtime differs from PyTorch by {agreement:.1e} (> {AGREEMENT:g})")
    faster = "onnxruntime" if timings["onnxruntime"]["total"] < timings["torch"]["total"] else "torch"
    return Engine(faster, run if faster == "onnxruntime" else torch_engine.embed_batch, agreement, timings)


def onnx_embedder(model, probe):
    """The embedder exported to ONNX (``mltk.export``'s exporter) in memory, run by an ONNX Runtime session on the CPU."""
    import torch

    from mltk.export import Normalised, check_onnx_available, write_onnx

    check_onnx_available()
    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="mltk-serve-") as scratch:
        path = Path(scratch) / "model.onnx"
        module = Normalised(model.embedder).eval()
        with torch.inference_mode(False), torch.no_grad():
            write_onnx(module, probe[:2].cpu(), path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the cores torch would use, no more
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep: the server's other threads need the cores
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def embed_batch(batch):
        return session.run(["embeddings"], {"images": batch.cpu().numpy().astype(np.float32)})[0]

    return embed_batch


def _time(embed_batch, probe) -> dict:
    """Milliseconds per batch of 1 and of 8 (best of 5, after a warm-up)."""
    out = {}
    for n in (1, 8):
        batch = probe[:n] if len(probe) >= n else probe[:1].repeat(n, 1, 1, 1)
        embed_batch(batch)
        best = min(_timed(embed_batch, batch) for _ in range(5))
        out[f"batch{n}"] = round(best * 1000, 2)
    out["total"] = round(out["batch1"] + out["batch8"], 2)
    return out


def _timed(call, batch) -> float:
    start = time.perf_counter()
    call(batch)
    return time.perf_counter() - start


def probe_batch(model, opened, n: int = 8):
    """A preprocessed batch of up to ``n`` gallery images (what the engines are compared on); noise where none decodes."""
    import torch

    from mltk.data import open_image

    tensors = []
    for path in opened.paths[:n]:
        try:
            tensors.append(model.transform(open_image(path, model.mode)))
        except (OSError, ValueError):
            continue
    if tensors:
        return torch.stack(tensors)
    channels, height, width = model.data_config["input_size"]
    return torch.randn(n, channels, height, width, generator=torch.Generator().manual_seed(0))


def create_app(settings: ServeSettings, model=None):
    """The FastAPI app serving ``settings.index`` (``model``: its model, when the caller has it loaded)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    gallery = Gallery(Path(settings.index), model, settings.device)
    engine = choose_engine(gallery.model, settings.engine, probe_batch(gallery.model, gallery.now[0]))
    batcher = Batcher(engine.embed_batch, settings.max_batch, settings.max_wait_ms)

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="mltk serve", description=f"Search, verify and enrol against the index {Path(settings.index).name}.", lifespan=lifespan)
    app.state.gallery, app.state.batcher, app.state.engine = gallery, batcher, engine
    open_routes = {"/", "/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/page.js"}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """The token (when set) on every route but the page's; a body over the limit refused from its length."""
        if settings.token and request.url.path not in open_routes:
            import hmac

            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {settings.token}".encode()):
                return error(401, "this server needs 'Authorization: Bearer TOKEN'")
        length = request.headers.get("content-length")
        limit = settings.max_bytes * settings.max_images + 2**16
        if length is not None and (not length.isdigit() or int(length) > limit):
            return error(413, f"the request is {length} bytes; the limit is {limit}")
        return await call_next(request)

    @app.exception_handler(Refused)
    async def refused(request, exc: Refused):
        return error(exc.status, exc.message)

    @app.exception_handler(MltkError)
    async def mltk_error(request, exc: MltkError):
        return error(400 if isinstance(exc, UsageError) else 409, first_line(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        problem = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in problem.get("loc", ())[1:]) or "the request"
        return error(422, f"{where}: {problem.get('msg', 'is not valid')}")

    @app.exception_handler(Exception)
    async def crashed(request, exc: Exception):
        return error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    async def upload(file: UploadFile, what: str):
        data = await file.read(settings.max_bytes + 1)
        return await run_in_threadpool(decode_upload, data, settings.max_bytes, settings.max_pixels, what)

    async def vector(file: UploadFile, what: str) -> np.ndarray:
        import asyncio

        batcher.announce()
        try:
            image = await upload(file, what)
            tensor = await run_in_threadpool(lambda: gallery.model.transform(image.convert(gallery.model.mode)))
        except BaseException:
            batcher.withdraw()
            raise
        return await asyncio.wrap_future(batcher.submit(tensor))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(page_html(), headers=PAGE_HEADERS)

    @app.get("/page.js", include_in_schema=False)
    async def page_script():
        return Response(resources.files("mltk").joinpath("serve_page.js").read_text(encoding="utf-8"), media_type="text/javascript", headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        opened, point = gallery.now
        return {
            "model": opened.meta.get("model"), "kind": opened.meta["kind"], "dim": opened.meta["dim"], "count": opened.index.ntotal,
            "classes": len(opened.classes), "params": opened.meta["params"], "created": opened.meta.get("created"),
            "modified": opened.meta.get("modified"), "calibration": _calibration(opened, point), "max_bytes": settings.max_bytes,
            "max_images": settings.max_images, "engine": engine.describe(), "batches": batcher.batches,
        }

    @app.get("/classes")
    async def classes():
        opened, _ = gallery.now
        counts = np.bincount(opened.labels[opened.labels >= 0], minlength=len(opened.classes)) if opened.classes else []
        return [{"name": name, "images": int(n)} for name, n in zip(opened.classes, counts)]

    @app.post("/search")
    async def search(image: UploadFile = File(...), k: int = Form(5)):
        opened, point = gallery.now
        if not 1 <= k <= min(opened.index.ntotal, 100):
            raise Refused(400, f"k={k}: give 1 to {min(opened.index.ntotal, 100)}")
        query = await vector(image, "image")
        return await run_in_threadpool(_hits, opened, point, query, k, image.filename)

    @app.post("/verify")
    async def verify(image_a: UploadFile = File(...), image_b: UploadFile = File(...)):
        import asyncio

        _, point = gallery.now
        a, b = await asyncio.gather(vector(image_a, "image_a"), vector(image_b, "image_b"))
        score = float(a @ b)
        same = None if point is None else bool(score >= point.threshold)
        return {"same": same, "score": score, "threshold": _threshold(point)}

    @app.post("/embed")
    async def embed(image: UploadFile = File(...)):
        found = await vector(image, "image")
        return {"dim": int(found.shape[0]), "vector": [float(v) for v in found], "model": gallery.now[0].meta.get("model")}

    @app.post("/enrol")
    async def enrol(name: str = Form(...), images: list[UploadFile] = File(...)):
        from mltk.index_edits import check_class_name

        try:
            check_class_name(name)
        except UsageError as exc:
            raise Refused(400, first_line(exc)) from None
        if len(images) > settings.max_images:
            raise Refused(413, f"{len(images)} images; /enrol takes at most {settings.max_images} at a time")
        decoded = [await upload(file, f"image {i + 1} ({file.filename})") for i, file in enumerate(images)]
        return await run_in_threadpool(_enrol, gallery, name, decoded)

    @app.delete("/classes/{name}")
    async def remove(name: str):
        return await run_in_threadpool(_remove, gallery, name)

    @app.get("/gallery/{row}/image")
    async def thumbnail(row: str, size: int = 160):
        """Gallery image ``row`` (its line of paths.txt) as a JPEG thumbnail: by number only, never by a path."""
        opened, _ = gallery.now
        if not (row.isascii() and row.isdigit() and int(row) < opened.index.ntotal):
            raise Refused(404, f"no gallery image {row[:40]!r}; rows are numbered 0 to {opened.index.ntotal - 1}")
        data = await run_in_threadpool(_thumbnail, opened.paths[int(row)], max(16, min(size, 512)), settings.max_pixels)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    return app


PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'", "Cache-Control": "no-store"}


def error(status: int, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def page_html() -> str:
    return resources.files("mltk").joinpath("serve_page.html").read_text(encoding="utf-8")


def _threshold(point) -> dict | None:
    return None if point is None else {"score": point.threshold, "operating_point": point.name}


def _calibration(opened, point) -> dict | None:
    from mltk.index import calibration_of

    calibrated = calibration_of(opened.path, opened.meta)
    if calibrated is None:
        return None
    calibration = calibrated[0]
    return {**_threshold(point), "source": calibration.source, "negatives": calibration.negatives, "model": calibration.model}


def _hits(opened, point, query: np.ndarray, k: int, filename: str | None) -> dict:
    """One query's k nearest, as ``mltk search --json`` gives them, with each hit's gallery row (for its thumbnail)."""
    from mltk.knn import neighbours

    sims, rows = neighbours(opened.index, query[None, :].astype(np.float32), k)
    labelled = bool(opened.classes)
    hits = [
        {
            "rank": r + 1, "row": int(p), "path": opened.paths[p], "label": int(opened.labels[p]) if labelled else None,
            "class": opened.classes[opened.labels[p]] if labelled else None, "score": float(s),
            "match": None if point is None else bool(s >= point.threshold),
        }
        for r, (s, p) in enumerate(zip(sims[0], rows[0]))
    ]
    match = None if point is None else any(h["match"] for h in hits)
    return {"query": filename, "match": match, "threshold": _threshold(point), "neighbours": hits}


def _enrol(gallery: Gallery, name: str, images: list) -> dict:
    """Uploaded images added to the gallery as class ``name``: saved to a scratch folder (as PNG, never under a client's
    name), added with copies kept in the index (``enrolled/``), then the new version read back."""
    from mltk.data import LabelledImages
    from mltk.embedding import EmbedSettings
    from mltk.index_edits import add_images

    with gallery.edits, tempfile.TemporaryDirectory(prefix="mltk-enrol-") as scratch:
        files = []
        for i, image in enumerate(images):
            files.append(Path(scratch) / f"{i}.png")
            image.save(files[-1], format="PNG")
        edit, _ = add_images(gallery.path, LabelledImages(files, [-1] * len(files), []), class_name=name, keep_copies=True, model=gallery.model,
                             settings=EmbedSettings(batch_size=32, workers=0))
        gallery.reload()
    return {"class": name, "added": edit.added, "new_class": edit.new_class, "count": edit.count, "classes": edit.classes}


def _remove(gallery: Gallery, name: str) -> dict:
    from mltk.index_edits import remove_class

    with gallery.edits:
        opened, _ = gallery.now
        if name not in opened.classes:
            raise Refused(404, f"the gallery has no class {name!r}")
        edit = remove_class(gallery.path, name)
        gallery.reload()
    return {"class": name, "removed": edit.removed, "count": edit.count, "classes": edit.classes}


def _thumbnail(path: str, size: int, max_pixels: int) -> bytes:
    """Gallery image ``path`` (a line of paths.txt, never a request's) as a JPEG of at most ``size`` pixels a side."""
    from PIL import Image

    try:
        with Image.open(path, formats=FORMATS) as image:
            if image.size[0] * image.size[1] > max_pixels:
                raise Refused(413, "the gallery image is over the pixel limit")
            image.thumbnail((size, size))
            out = io.BytesIO()
            image.convert("RGB").save(out, format="JPEG", quality=85)
            return out.getvalue()
    except (OSError, ValueError) as exc:
        raise Refused(404, f"the gallery image cannot be read ({first_line(exc)})") from None


def serve(settings: ServeSettings, on_ready=lambda url, engine: None) -> None:
    """Take the port (one that cannot be taken is one line, before anything loads), load the index, and run the server
    until Ctrl-C."""
    import socket

    import uvicorn

    settings.check()
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((settings.host, settings.port))
    except OSError as exc:
        listener.close()
        raise MltkError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}; give another --port (or --host)") from None
    try:
        app = create_app(settings)
    except BaseException:
        listener.close()
        raise
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False)
    port = listener.getsockname()[1]
    on_ready(f"http://{settings.host if family == socket.AF_INET else f'[{settings.host}]'}:{port}/", app.state.engine)
    uvicorn.Server(config).run(sockets=[listener])
