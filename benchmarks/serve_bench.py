"""mltk serve under load: latency (p50 / p95 / p99) and requests/s of POST /search at 1, 8 and 32 concurrent clients on a
10,000-image gallery, eager PyTorch against ONNX Runtime; then a soak (32 clients, bounded in time) that counts 5xx
answers and follows the server's memory.

    python benchmarks/serve_bench.py                       # both engines, then a 180 s soak; results in benchmarks/results/
    python benchmarks/serve_bench.py --engines torch --soak 0

The gallery: Omniglot background-small (4,840 images), each also mirrored (another 4,840), and 320 AT&T faces: 10,000
images, built once under --work. The model: a ResNet-18 at 64 px with a 512-d neck, as the Omniglot recipe trains it
(`mltk run --epochs 0`: its weights do not change its speed). The load generator runs on the same machine, on the
loopback, so it takes CPU from the server: the figures are what one 2-core machine does with both.
"""

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MLTK_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"


def mltk(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mltk", *args], check=True, cwd=REPO)


def gallery(work: Path) -> Path:
    """10,000 images as <class>/<image>: Omniglot, Omniglot mirrored (each a class of its own), AT&T s1-s32."""
    from PIL import Image, ImageOps

    root = work / "gallery"
    if root.is_dir() and sum(1 for _ in root.rglob("*.png")) == 10_000:
        return root
    shutil.rmtree(root, ignore_errors=True)
    for character in sorted((DATA / "omniglot_background_small").iterdir()):
        if not character.is_dir():
            continue
        for mirrored in (False, True):
            folder = root / (character.name + ("_mirrored" if mirrored else ""))
            folder.mkdir(parents=True)
            for image in sorted(character.glob("*.png")):
                with Image.open(image) as opened:
                    (ImageOps.mirror(opened) if mirrored else opened).save(folder / image.name)
    for person in [f"s{i}" for i in range(1, 33)]:
        folder = root / f"att_{person}"
        folder.mkdir(parents=True)
        for image in sorted((DATA / "att_faces" / person).glob("*.pgm")):
            with Image.open(image) as opened:
                opened.save(folder / (image.stem + ".png"))
    count = sum(1 for _ in root.rglob("*.png"))
    assert count == 10_000, f"the gallery holds {count} images, not 10,000"
    return root


def build(work: Path) -> Path:
    run, index = work / "run", work / "index"
    if not (run / "last.pt").is_file():
        mltk("run", "--data", str(DATA / "att_faces"), "--backbone", "resnet18", "--no-pretrained", "--image-size", "64", "--dim", "512",
             "--epochs", "0", "--out", str(run), "--overwrite", "--quiet")
    if not (index / "meta.json").is_file():
        mltk("index", str(run), "--data", str(gallery(work)), "--out", str(index))
    return index


class Served:
    def __init__(self, index: Path, engine: str, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "mltk", "serve", str(index), "--port", str(port), "--engine", engine],
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.line = self.process.stdout.readline().strip()
        import httpx2 as httpx

        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        self.info = httpx.get(self.url + "/info", timeout=30).json()

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


async def load(url: str, images: list[bytes], clients: int, requests: int, seconds: float) -> dict:
    """``clients`` concurrent clients posting /search (the ``images`` in turn) until ``requests`` are answered or ``seconds`` pass."""
    import httpx2 as httpx

    latencies, statuses, sent = [], {}, 0
    deadline = time.perf_counter() + seconds

    async def client(http) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            image = images[sent % len(images)]
            sent += 1
            start = time.perf_counter()
            response = await http.post("/search", files={"image": ("q.png", image, "image/png")}, data={"k": "10"})
            latencies.append(time.perf_counter() - start)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    ms = sorted(x * 1000 for x in latencies)
    pick = lambda q: ms[min(len(ms) - 1, int(round(q * (len(ms) - 1))))]  # noqa: E731
    return {"clients": clients, "requests": len(ms), "seconds": round(wall, 1), "requests_per_s": round(len(ms) / wall, 1),
            "p50_ms": round(pick(0.5), 1), "p95_ms": round(pick(0.95), 1), "p99_ms": round(pick(0.99), 1), "statuses": statuses}


async def soak(served: Served, images: list[bytes], seconds: float) -> dict:
    """32 clients for ``seconds``, the server's resident memory sampled every 10 s."""
    samples = []

    async def sample() -> None:
        while True:
            samples.append(round(served.rss_mib(), 1))
            await asyncio.sleep(10)

    sampler = asyncio.create_task(sample())
    result = await load(served.url, images, 32, 10**9, seconds)
    sampler.cancel()
    samples.append(round(served.rss_mib(), 1))
    return {**result, "rss_mib": samples, "errors_5xx": sum(n for code, n in result["statuses"].items() if code >= 500)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mltk-serve-bench"), help="gallery, run and index (built once)")
    parser.add_argument("--engines", default="torch,onnx")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=400, help="per level, at most")
    parser.add_argument("--seconds", type=float, default=40, help="per level, at most")
    parser.add_argument("--soak", type=float, default=180, help="seconds of 32 clients (0: none)")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_bench.json", help="where the figures go (JSON)")
    args = parser.parse_args()

    index = build(args.work)
    queries = [p.read_bytes() for p in sorted((DATA / "omniglot_background_small").glob("*/*.png"))[::300]]  # 17 images, in turn
    results = {"index": str(index), "cpu": os.cpu_count(), "levels": {}, "soak": None, "engines": {}}
    for engine in args.engines.split(","):
        served = Served(index, engine, args.port)
        try:
            results["engines"][engine] = served.info["engine"]
            print(f"{engine}: {served.line}", flush=True)
            rows = []
            for clients in map(int, args.clients.split(",")):
                row = asyncio.run(load(served.url, queries, clients, args.requests, args.seconds))
                rows.append(row)
                print(f"  {clients:>2} clients: {row['requests_per_s']:>6} req/s  p50 {row['p50_ms']:>7} ms  p95 {row['p95_ms']:>7} ms  "
                      f"p99 {row['p99_ms']:>7} ms  ({row['requests']} requests, {row['statuses']})", flush=True)
            results["levels"][engine] = rows
            if args.soak and engine == args.engines.split(",")[-1]:
                results["soak"] = asyncio.run(soak(served, queries, args.soak))
                s = results["soak"]
                print(f"soak: {s['requests']} requests in {s['seconds']} s ({s['requests_per_s']} req/s), 5xx {s['errors_5xx']}, "
                      f"p99 {s['p99_ms']} ms, server RSS MiB {s['rss_mib']}", flush=True)
        finally:
            served.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
