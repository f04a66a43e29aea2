"""GPU benchmark (issue 16): ``mltk run`` beside a plain timm + PML loop, and mltk's metrics at N = 1,000,000
beside PML's AccuracyCalculator, each against the GPU's physical limit.

    python benchmarks/gpu_bench.py --out OUT            # on a GPU machine (benchmarks/gpu_run.sh runs it)
    python benchmarks/gpu_bench.py --smoke --out /tmp/gb  # the script's logic on the CPU, tiny sizes, not figures

Training: a synthetic ImageFolder of seeded JPEGs (512 classes x 16 images at 256 px, written once into a
temporary folder) read by both contenders with timm's evaluation transform at 224 px. Same model (ResNet-50,
512-dim embedding, ArcFace), batches of 128 with 4 a class, mixed precision (bf16 where the GPU has it), the
same DataLoader workers. ``mltk run`` runs as the command itself in its own process (its defaults otherwise:
in-memory images, channels-last, fused AdamW); its images/s is that of its epochs in metrics.jsonl. The plain
loop runs in a process of its own too: timm.create_model, PML's ArcFaceLoss and MPerClassSampler, Adam,
torch.autocast (+ GradScaler for fp16), a DataLoader with pinned memory; its epochs are timed the same way
(CUDA synchronised). Both: images/s over the epochs after the first (warm-up).

Evaluation: ``metrics_bench.make_data``'s clustered embeddings (512 dims, ~50 a class, spread 3), each
contender in its own process after a small warm-up call (CUDA context, cuBLAS, numba compiled; its seconds
are reported apart): ``mltk.metrics.evaluate_embeddings(x, labels)`` (every metric) and PML's
AccuracyCalculator(precision_at_1, r_precision, mean_average_precision_at_r; k="max_bin_count") on CUDA
tensors, with faiss-gpu's kNN (PML's default) where faiss sees a GPU, else PML's own torch kNN on the GPU
(CustomKNN(CosineSimilarity(), batch_size)). Peak GPU memory: torch's allocator peak in the process, and the
device's used memory sampled through NVML (which sees faiss's allocations too) above what was used before.

The limit: the all-pairs pass of the symmetric similarity matrix is 2·d·N(N-1)/2 FLOPs (a multiply and an add
per dimension for each pair i < j); divided by the device's peak at the matmul precision in use (fp32 unless torch allows TF32) it gives the
seconds no implementation can beat. Peaks are NVIDIA's datasheet figures (GPU_PEAKS, with their URLs).

Writes OUT/gpu_bench.json and OUT/gpu_bench.md (after every phase, so a run cut short keeps what it did).
"""

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from metrics_bench import make_data  # noqa: E402

# Dense TFLOPS (fp32, TF32 tensor core, bf16 tensor core) from NVIDIA's datasheets, whose tensor-core figures
# are "with sparsity" (2:4): halved here. Matched in this order against torch.cuda.get_device_name().
H100_SHEET = "https://www.nvidia.com/en-us/data-center/h100/ (H100 datasheet)"
H200_SHEET = "https://www.nvidia.com/en-us/data-center/h200/ (H200 datasheet)"
A100_SHEET = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
GPU_PEAKS = {
    "H200 NVL": dict(fp32=60.0, tf32=835 / 2, bf16=1671 / 2, source=H200_SHEET),
    "H200": dict(fp32=67.0, tf32=989 / 2, bf16=1979 / 2, source=H200_SHEET + ", H200 SXM"),
    "H100 NVL": dict(fp32=60.0, tf32=835 / 2, bf16=1671 / 2, source=H100_SHEET),
    "H100 PCIe": dict(fp32=51.0, tf32=756 / 2, bf16=1513 / 2, source=H100_SHEET),
    "H100": dict(fp32=67.0, tf32=989 / 2, bf16=1979 / 2, source=H100_SHEET + ", H100 SXM"),
    "A100": dict(fp32=19.5, tf32=156.0, bf16=312.0, source=A100_SHEET + " (dense figures given there)"),
}
TRAIN_RATIO_TARGET = 1.2  # mltk run's images/s over the plain loop's
EVAL_LIMIT_TARGET = 2.0  # mltk's evaluation seconds over the all-pairs FLOP limit's
MLTK_METRICS = ("roc_auc", "tar@far", "eer", "recall@", "map@r")  # the issue's "all of" list, as key prefixes

FULL = dict(device="cuda", amp=True, backbone="resnet50", image_size=224, jpeg_size=256, classes=512, per_class=16,
            batch_size=128, m_per_class=4, dim=512, epochs=4, workers=12, eval_n=1_000_000, eval_dim=512)
SMOKE = dict(device="cpu", amp=False, backbone="test_resnet", image_size=32, jpeg_size=40, classes=16, per_class=8,
             batch_size=32, m_per_class=4, dim=64, epochs=3, workers=2, eval_n=20_000, eval_dim=64)


# ---- machine ------------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    """Python, torch, the GPU (in a subprocess: this process never touches CUDA) and its driver."""
    code = (
        "import json, torch; c = torch.cuda.is_available()\n"
        "print(json.dumps(dict(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),"
        " gpu=torch.cuda.get_device_name(0) if c else None, capability='.'.join(map(str, torch.cuda.get_device_capability(0))) if c else None,"
        " bf16=bool(c and torch.cuda.is_bf16_supported()), allow_tf32=torch.backends.cuda.matmul.allow_tf32,"
        " float32_matmul_precision=torch.get_float32_matmul_precision(), torch_threads=torch.get_num_threads())))"
    )
    info = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["driver"], info["gpu_memory"] = [s.strip() for s in smi.stdout.splitlines()[0].split(",")]
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        info["driver"] = info["gpu_memory"] = None
    return {**info, "device": device, "python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node()}


def device_peaks(gpu: str | None) -> dict | None:
    """The datasheet peaks of ``gpu`` (a torch device name), or None: an unknown peak."""
    for key, peaks in GPU_PEAKS.items():
        if gpu and key.lower() in gpu.lower():
            return {"matched": key, **peaks}
    return None


class DeviceMemory:
    """The GPU's used memory, sampled through NVML every 20 ms while the block runs; ``peak_gib`` is the most used
    above what was used on entry (every process's allocations: faiss's too). None without NVML."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.used = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
        except Exception:  # no nvidia-ml-py, no driver: not measured
            self.used = None
        self.peak_gib = None

    def __enter__(self):
        if self.used:
            self.base = self.most = self.used()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def poll(self):
        while not self.stop.wait(0.02):
            self.most = max(self.most, self.used())

    def __exit__(self, *exc):
        if self.used:
            self.stop.set()
            self.thread.join()
            self.peak_gib = round((self.most - self.base) / 2**30, 2)


# ---- running a contender in its own process, with a time limit -------------------------------------


def run_process(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run ``cmd`` in a new process group; returns its last stdout line when it is JSON (a worker's result), or
    ``error`` / ``timeout_s``, with its peak resident memory and the device memory it took. Its stderr goes to ours,
    and its other stdout lines after it ends."""
    with tempfile.TemporaryFile("w+") as out, DeviceMemory() as gpu_memory:
        started = time.perf_counter()
        process = subprocess.Popen(cmd, stdout=out, env=env, start_new_session=True)
        status, timed_out = None, False
        try:
            while status is None:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if not pid:
                    status = None
                    if time.perf_counter() - started > timeout:
                        timed_out = True
                        break
                    time.sleep(0.1)
        finally:  # timed out, or this process is being stopped (gpu_run.sh's timeout): the whole group, workers too
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if status is None:
                _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        out.seek(0)
        lines = out.read().strip().splitlines()
    result = json.loads(lines.pop()) if lines and lines[-1].startswith("{") else {}  # a worker's one JSON line
    if lines:  # what the command printed besides (mltk run's summary): into the log
        print("\n".join(lines), file=sys.stderr, flush=True)
    row = {"process_seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "device_memory_gib": gpu_memory.peak_gib}
    code = os.waitstatus_to_exitcode(status)
    if timed_out:
        return {**row, "timeout_s": round(timeout)}
    if code != 0:
        return {**row, "error": f"exit code {code} (its output: bench.log)"}
    return {**row, **result}


class Budget:
    """Seconds left of ``--budget`` (0: no limit): each phase's time limit is its cap or what is left, less a reserve."""

    def __init__(self, seconds: float, reserve: float = 10):
        self.deadline = time.monotonic() + seconds if seconds else None
        self.reserve = reserve

    def limit(self, cap: float) -> float:
        if self.deadline is None:
            return cap
        return min(cap, self.deadline - time.monotonic() - self.reserve)


def contender(what: str, cmd: list[str], cap: float, budget: Budget, env: dict | None = None) -> dict:
    limit = budget.limit(cap)
    if limit < 15:
        row = {"what": what, "skipped": f"out of time: {max(0, limit):.0f} s of the budget left"}
    else:
        print(f"-- {what}: {' '.join(cmd[1:])}  (limit {limit:.0f} s)", file=sys.stderr, flush=True)
        row = {"what": what, **run_process(cmd, limit, env)}
    print(f"   {json.dumps(row)[:600]}", file=sys.stderr, flush=True)
    return row


# ---- training ------------------------------------------------------------------------------------


def write_class(args: tuple) -> None:
    """One class's seeded JPEGs: a smooth class pattern, a smooth per-image variation and fine grain (JPEG
    sizes and decoding costs like a photograph's, not like pure noise's)."""
    from PIL import Image

    root, c, count, size, seed = args
    rng = np.random.default_rng([seed, c])
    folder = Path(root) / f"class_{c:04d}"
    folder.mkdir(parents=True, exist_ok=True)

    def smooth(cells: int, scale: float) -> np.ndarray:
        small = Image.fromarray((rng.random((cells, cells, 3)) * 255).astype(np.uint8))
        return np.asarray(small.resize((size, size), Image.BICUBIC), np.float32) * scale

    base = smooth(6, 0.7)
    for i in range(count):
        pixels = base + smooth(24, 0.3) + rng.normal(0, 6, (size, size, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.jpg", quality=90)


def make_images(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> dict:
    from multiprocessing import Pool

    with Pool(os.cpu_count()) as pool:
        pool.map(write_class, [(str(root), c, per_class, size, seed) for c in range(classes)])
    files = list(root.rglob("*.jpg"))
    return {"images": len(files), "classes": classes, "jpeg_px": size, "mean_jpeg_kb": round(sum(f.stat().st_size for f in files) / len(files) / 1024, 1)}


def steady(epochs: list[dict], warmup: int) -> float | None:
    """Images/s over the epochs after the first ``warmup`` (all of them when there are no more)."""
    kept = epochs[warmup:] or epochs
    return round(sum(e["images"] for e in kept) / sum(e["seconds"] for e in kept), 1) if kept else None


def plain_worker(args) -> None:
    """In its own process: the loop a user writes by hand with timm and PML, timed epoch by epoch."""
    import timm
    import torch
    import torchvision
    from pytorch_metric_learning import losses, samplers
    from pytorch_metric_learning.utils import common_functions as c_f
    from timm.data import create_transform, resolve_data_config

    device = torch.device(args.device)
    torch.manual_seed(0)
    c_f.NUMPY_RANDOM = np.random.RandomState(0)  # MPerClassSampler draws from it
    model = timm.create_model(args.backbone, pretrained=False, num_classes=args.dim).to(device)
    data_cfg = {**resolve_data_config({}, model=model), "input_size": (3, args.image_size, args.image_size)}
    dataset = torchvision.datasets.ImageFolder(args.images, transform=create_transform(**data_cfg, is_training=False))
    loss_fn = losses.ArcFaceLoss(num_classes=len(dataset.classes), embedding_size=args.dim).to(device)
    sampler = samplers.MPerClassSampler(dataset.targets, m=args.m_per_class, batch_size=args.batch_size, length_before_new_iter=len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=True,
                                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    optimizer = torch.optim.Adam([{"params": model.parameters(), "lr": 1e-3}, {"params": loss_fn.parameters(), "lr": 1e-2}])
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and dtype == torch.float16)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    epochs = []
    model.train()
    for _ in range(args.epochs):
        sync()
        started, images = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=args.amp):
                embeddings = model(x)
            loss = loss_fn(embeddings.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            images += len(y)
        sync()
        epochs.append({"images": images, "seconds": round(time.perf_counter() - started, 3), "loss": round(loss.item(), 4)})
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    print(json.dumps({"epochs": epochs, "amp_dtype": str(dtype).split(".")[-1] if args.amp else None, "torch_peak_gib": peak and round(peak, 2)}))


def mltk_command(images: Path, run_dir: Path, s: dict, extra: tuple = ()) -> list[str]:
    return [
        sys.executable, "-m", "mltk", "run", "--data", str(images), "--backbone", s["backbone"], "--image-size", str(s["image_size"]),
        "--dim", str(s["dim"]), "--loss", "arcface", "--batch-size", str(s["batch_size"]), "--m-per-class", str(s["m_per_class"]),
        "--epochs", str(s["epochs"]), "--workers", str(s["workers"]), "--device", s["device"], "--amp" if s["amp"] else "--no-amp",
        "--no-pretrained", "--out", str(run_dir), "--quiet", *extra,
    ]


def mltk_run(what: str, images: Path, run_dir: Path, s: dict, cap: float, budget: Budget, extra: tuple = ()) -> dict:
    """``mltk run`` itself, in its own process; its epochs as metrics.jsonl records them."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    row = contender(what, mltk_command(images, run_dir, s, extra), cap, budget, env)
    if (run_dir / "metrics.jsonl").exists():
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        row["epochs"] = [{"images": round(h["images_per_s"] * h["seconds"]), "seconds": round(h["seconds"], 3), "loss": round(h["loss"], 4)} for h in history]
        config = (run_dir / "config.yaml").read_text().splitlines()
        row["amp"] = next((line.split(":", 1)[1].strip() for line in config if line.startswith("amp:")), None)
    return row


def bench_training(s: dict, budget: Budget, cap: float, warmup: int, streaming_row: bool) -> dict:
    """Both contenders on the same freshly written JPEGs; images/s over the epochs after the warm-up."""
    with tempfile.TemporaryDirectory(prefix="gpu_bench_images_") as tmp:
        images = Path(tmp) / "images"
        started = time.perf_counter()
        data = make_images(images, s["classes"], s["per_class"], s["jpeg_size"])
        data["write_seconds"] = round(time.perf_counter() - started, 1)
        print(f"training data: {data}", file=sys.stderr, flush=True)
        plain_args = ["--images", str(images)] + [f"--{k.replace('_', '-')}={v}" for k, v in s.items() if k in PLAIN_OPTIONS]
        rows = [contender("plain timm + PML loop", [sys.executable, __file__, "--worker", "plain", *plain_args], cap, budget)]
        rows.append(mltk_run("mltk run", images, Path(tmp) / "run", s, cap, budget))
        if streaming_row:  # for reading the figures: mltk decoding every JPEG every epoch, as the plain loop does
            rows.append(mltk_run("mltk run --no-in-memory", images, Path(tmp) / "run2", s, cap, budget, ("--no-in-memory",)))
    for row in rows:
        if row.get("epochs") and "timeout_s" not in row and "error" not in row:
            row["images_per_s"] = steady(row["epochs"], warmup)
    plain, mltk = (r.get("images_per_s") for r in rows[:2])
    ratio = round(mltk / plain, 3) if plain and mltk else None
    command = " ".join(mltk_command(Path("IMAGES"), Path("RUN"), s)[1:])
    return {"settings": {**s, "warmup_epochs": warmup}, "data": data, "rows": rows, "mltk_command": f"python {command}",
            "mltk_over_plain": ratio, "target": {"wanted": f"mltk run >= {TRAIN_RATIO_TARGET}x the plain loop", "met": None if ratio is None else ratio >= TRAIN_RATIO_TARGET}}


PLAIN_OPTIONS = ("device", "amp", "backbone", "image_size", "dim", "batch_size", "m_per_class", "epochs", "workers")


# ---- evaluation ----------------------------------------------------------------------------------


def eval_worker(args) -> None:
    """In its own process: load the embeddings, warm up on the first rows, then time the one call."""
    import torch

    with np.load(args.data) as arrays:
        x, labels = arrays["x"], arrays["labels"]
    cuda = torch.cuda.is_available() and args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    info = {}
    if args.worker == "mltk":
        from mltk.metrics import evaluate_embeddings

        options = {"max_pairs": len(x) * len(x)} if args.all_pairs else {}

        def call(x, labels):
            return evaluate_embeddings(x, labels, **options).values
    else:
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        from pytorch_metric_learning.utils.inference import CustomKNN, FaissKNN

        try:
            import faiss

            faiss_gpus = faiss.get_num_gpus()
        except ImportError:
            faiss_gpus = 0
        if cuda and faiss_gpus > 0:
            knn, info["knn"] = FaissKNN(), "faiss-gpu (PML's default FaissKNN)"
        else:
            knn, info["knn"] = CustomKNN(CosineSimilarity(), batch_size=args.pml_batch), f"PML's torch CustomKNN(CosineSimilarity(), batch_size={args.pml_batch}) (faiss sees {faiss_gpus} GPUs)"
        calculator = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count", knn_func=knn)
        device = "cuda" if cuda else "cpu"

        def call(x, labels):
            return calculator.get_accuracy(torch.from_numpy(x).to(device), torch.from_numpy(labels).to(device))

    warm = np.flatnonzero(labels < 40)[:2000]  # ~40 whole classes
    started = time.perf_counter()
    call(x[warm], labels[warm])  # CUDA context, cuBLAS handles, numba's compilation: not the metric's cost
    sync()
    warmup = time.perf_counter() - started
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    values = call(x, labels)
    sync()
    seconds = time.perf_counter() - started
    print(json.dumps({
        "seconds": round(seconds, 3), "warmup_seconds": round(warmup, 2), **info,
        "torch_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32, "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "values": {k: float(v) if math.isfinite(v) else str(v) for k, v in values.items()},  # strict JSON: "inf" as text
    }))


def matmul_precision(row: dict) -> str:
    """The precision of a process's float32 matmuls on the GPU: TF32 where torch allows it, else fp32 (IEEE)."""
    return "tf32" if row.get("allow_tf32") or row.get("float32_matmul_precision") in ("high", "medium") else "fp32"


def bench_evaluation(s: dict, args, peaks: dict | None, budget: Budget) -> dict:
    n, d = s["eval_n"], s["eval_dim"]
    started = time.perf_counter()
    x, labels = make_data(n, d, args.class_size, args.spread)
    data = {"n": n, "dim": d, "class_size": args.class_size, "spread": args.spread, "classes": int(labels.max() + 1),
            "largest_class": int(np.bincount(labels).max()), "pairs": n * (n - 1) // 2}
    flops = 2 * d * data["pairs"]
    limit = {"flops": flops, "formula": "2·d·N(N-1)/2 (one multiply-add per dimension per pair i < j)",
             "seconds_at_peak": {p: round(flops / (peaks[p] * 1e12), 3) for p in ("fp32", "tf32", "bf16")} if peaks else None,
             "peaks_tflops": {p: peaks[p] for p in ("fp32", "tf32", "bf16")} if peaks else None,
             "source": peaks["source"] if peaks else "unknown peak: this GPU is not in GPU_PEAKS", "matched": peaks and peaks["matched"]}
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_bench_eval_") as tmp:
        path = Path(tmp) / "data.npz"
        np.savez(path, x=x, labels=labels)
        del x
        data["make_seconds"] = round(time.perf_counter() - started, 1)
        print(f"evaluation data: {data}", file=sys.stderr, flush=True)
        common = ["--data", str(path), "--device", s["device"], "--pml-batch", str(args.pml_batch)] + ["--all-pairs" if args.all_pairs else "--no-all-pairs"]
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        rows.append(contender("PML AccuracyCalculator", [sys.executable, __file__, "--worker", "pml", *common], args.pml_timeout, budget, env))
        rows.append(contender("mltk evaluate_embeddings", [sys.executable, __file__, "--worker", "mltk", *common], args.eval_timeout, budget, env))
    for row in rows:
        if "seconds" in row:
            row["precision"] = matmul_precision(row)
            if peaks:
                row["over_limit"] = round(row["seconds"] / limit["seconds_at_peak"][row["precision"]], 2)
    return {"data": data, "limit": limit, "rows": rows, "agreement": agreement(*rows), "targets": eval_targets(*rows)}


def agreement(pml: dict, mltk: dict) -> dict:
    """P@1 and MAP@R of both, and whether they agree to 1e-3 (ties may be broken differently)."""
    pairs = {"precision@1": "precision_at_1", "map@r": "mean_average_precision_at_r"}
    if "values" not in pml or "values" not in mltk:
        return {}
    out = {}
    for ours, theirs in pairs.items():
        a, b = mltk["values"].get(ours), pml["values"].get(theirs)
        out[ours] = {"mltk": a, "PML": b, "agree": a is not None and b is not None and abs(a - b) <= 1e-3}
    return out


def eval_targets(pml: dict, mltk: dict) -> dict:
    values = mltk.get("values", {})
    missing = [m for m in MLTK_METRICS if not any(k.startswith(m) for k in values)]
    over = mltk.get("over_limit")
    faster = mltk["seconds"] < pml["seconds"] if "seconds" in mltk and "seconds" in pml else None
    return {
        "within_limit": {"wanted": f"mltk <= {EVAL_LIMIT_TARGET}x the all-pairs FLOP limit at its precision", "met": None if over is None else over <= EVAL_LIMIT_TARGET},
        "faster_than_pml": {"wanted": "mltk faster than PML's AccuracyCalculator", "met": faster},
        "all_metrics": {"wanted": "ROC-AUC, TAR@FAR, EER, recall@k and MAP@R all computed", "met": None if not values else not missing, "missing": missing,
                        "pairs_sampled": bool(values.get("pairs_sampled")) if values else None},
    }


# ---- report --------------------------------------------------------------------------------------


def fmt(v, unit: str = "") -> str:
    return "–" if v is None else f"{v:,}{unit}" if isinstance(v, int) else f"{v:,.2f}{unit}" if isinstance(v, float) else str(v)


def value(v) -> str:
    """A metric value: counts with separators, rates to 4 decimals, text (inf) as it is."""
    if v is None or isinstance(v, str):
        return "–" if v is None else v
    return f"{int(v):,}" if float(v).is_integer() and abs(v) > 1 else f"{v:.4f}"


def outcome(row: dict) -> str | None:
    if "timeout_s" in row:
        return f"timed out after {row['timeout_s']} s"
    return row.get("error") or row.get("skipped")


def met(target: dict) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[target["met"]]


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# GPU benchmark" + (" — SMOKE RUN on the CPU: logic only, not figures" if report["smoke"] else ""), "",
             f"`{report['command']}`", "",
             f"Machine: {m.get('gpu') or 'no GPU (' + m['device'] + ')'}, driver {fmt(m.get('driver'))}, {fmt(m.get('gpu_memory'))}; "
             f"{m['cpus']} CPUs; Python {m['python']}, torch {m['torch']} (CUDA {fmt(m.get('cuda'))}, cuDNN {fmt(m.get('cudnn'))}); "
             f"torch allows TF32 matmuls: {m['allow_tf32']} (float32 matmul precision '{m['float32_matmul_precision']}').", ""]
    if "train" in report:
        t = report["train"]
        s = t["settings"]
        lines += ["## Training: `mltk run` beside a plain timm + PML loop", "",
                  f"{s['backbone']}, {s['image_size']} px, {s['dim']}-dim ArcFace, batches of {s['batch_size']} ({s['m_per_class']} a class), "
                  f"AMP {'on' if s['amp'] else 'off'}, {s['workers']} loader workers, {s['epochs']} epochs of {t['data']['images']:,} JPEGs "
                  f"({t['data']['classes']} classes, {t['data']['jpeg_px']} px, {t['data']['mean_jpeg_kb']} KiB each); "
                  f"images/s over epochs {s['warmup_epochs'] + 1}–{s['epochs']} (the first {s['warmup_epochs']} warm up).", "",
                  f"mltk: `{t['mltk_command']}`", "",
                  "| what | images/s | per epoch (images/s) | AMP | torch peak (GiB) | device memory (GiB) | process (s) |", "|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            per_epoch = ", ".join(f"{e['images'] / e['seconds']:.0f}" for e in r.get("epochs", []))
            shown = outcome(r) or f"{r.get('images_per_s') or 0:,.0f}"
            amp = r.get("amp_dtype") or {"true": "on (bf16 where the GPU has it, else fp16)", "false": "off"}.get(r.get("amp"), "off" if "epochs" in r else "–")
            lines.append(f"| {r['what']} | {shown} | {per_epoch or '–'} | {amp} | {fmt(r.get('torch_peak_gib'))} | {fmt(r.get('device_memory_gib'))} | {fmt(r.get('process_seconds'))} |")
        lines += ["", f"mltk run / plain loop: **{fmt(t['mltk_over_plain'])}×** — target ≥ {TRAIN_RATIO_TARGET}×: {met(t['target'])}.", ""]
    if "eval" in report:
        e, lim = report["eval"], report["eval"]["limit"]
        d = e["data"]
        lines += [f"## Evaluation at N = {d['n']:,} × {d['dim']}", "",
                  f"`metrics_bench.make_data` embeddings: {d['classes']:,} classes (~{d['class_size']} a class, largest {d['largest_class']}), spread {d['spread']}; "
                  f"{d['pairs']:.3e} pairs i < j. Seconds: the one call, after a warm-up call on 2,000 rows (its seconds apart).", ""]
        if lim["seconds_at_peak"]:
            sp, pk = lim["seconds_at_peak"], lim["peaks_tflops"]
            lines += [f"The limit: the all-pairs pass is {lim['formula']} = {lim['flops']:.3e} FLOPs. At this GPU's dense peaks "
                      f"({lim['matched']}; source: {lim['source']}) that is {sp['fp32']} s at fp32 ({pk['fp32']} TFLOPS), "
                      f"{sp['tf32']} s at TF32 ({pk['tf32']}), {sp['bf16']} s at bf16 ({pk['bf16']}). "
                      "Each row is compared at the precision its matmuls use (fp32 unless torch allows TF32). "
                      "PML's kNN computes all N² similarities (twice the pairs).", ""]
        else:
            lines += [f"The limit: {lim['formula']} = {lim['flops']:.3e} FLOPs; {lim['source']}.", ""]
        lines += ["| what | seconds | × limit (precision) | warm-up (s) | torch peak (GiB) | device memory (GiB) | kNN | values |", "|---|---|---|---|---|---|---|---|"]
        for r in e["rows"]:
            vals = ", ".join(f"{k} {value(v)}" for k, v in r.get("values", {}).items())
            over = f"{fmt(r.get('over_limit'))} ({r['precision']})" if "precision" in r else "–"
            lines.append(f"| {r['what']} | {outcome(r) or fmt(r.get('seconds'))} | {over} | {fmt(r.get('warmup_seconds'))} | {fmt(r.get('torch_peak_gib'))} | "
                         f"{fmt(r.get('device_memory_gib'))} | {r.get('knn', 'mltk blocks' if 'mltk' in r['what'] else '–')} | {vals} |")
        lines.append("")
        for key, a in e["agreement"].items():
            lines.append(f"- {key}: mltk {value(a['mltk'])}, PML {value(a['PML'])} — {'agree' if a['agree'] else 'DIFFER'} (to 1e-3)")
        targets = e["targets"]
        sampled = targets["all_metrics"]["pairs_sampled"]
        lines += [f"- target, {t['wanted']}: {met(t)}" for t in targets.values()]
        if sampled:
            lines.append("- mltk's ROC-AUC, TAR@FAR and EER here come from 10^7 sampled pairs (`--no-all-pairs`: past its default max_pairs of 10^10)")
        lines.append("")
    return "\n".join(lines)


def save(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_bench.md").write_text(markdown(report))


# ---- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the logic on the CPU at tiny sizes (not figures; never into benchmarks/results)")
    parser.add_argument("--out", help="folder for gpu_bench.{json,md} (default: benchmarks/results)")
    parser.add_argument("--parts", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    parser.add_argument("--workers", type=int, help=f"loader workers of both training loops (default {FULL['workers']})")
    parser.add_argument("--epochs", type=int, help=f"training epochs of each loop (default {FULL['epochs']})")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="epochs left out of images/s")
    parser.add_argument("--streaming-row", action="store_true", help="also time mltk run --no-in-memory (JPEGs decoded every epoch)")
    parser.add_argument("--eval-n", type=int, help=f"embeddings evaluated (default {FULL['eval_n']:,})")
    parser.add_argument("--class-size", type=int, default=50, help="mean embeddings a class (metrics_bench's)")
    parser.add_argument("--spread", type=float, default=3.0, help="noise around each class center (metrics_bench's)")
    parser.add_argument("--all-pairs", action=argparse.BooleanOptionalAction, default=True, help="mltk counts every pair for ROC-AUC/TAR/EER, as the target asks (--no-all-pairs: past its max_pairs of 10^10, 10^7 sampled pairs)")
    parser.add_argument("--pml-batch", type=int, default=4096, help="query rows a batch of PML's torch kNN (without faiss-gpu)")
    parser.add_argument("--budget", type=float, default=0, help="seconds for the whole benchmark; phases past it are recorded as skipped (0: none)")
    parser.add_argument("--train-timeout", type=float, default=150, help="seconds for each training contender")
    parser.add_argument("--pml-timeout", type=float, default=90, help="seconds for PML's evaluation")
    parser.add_argument("--eval-timeout", type=float, default=180, help="seconds for mltk's evaluation")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", "--images", dest="data", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    for key in ("backbone", "image_size", "dim", "batch_size", "m_per_class"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=str if key == "backbone" else int, help=argparse.SUPPRESS)
    parser.add_argument("--amp", type=lambda v: v == "True", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "plain":
        args.images = args.data
        return plain_worker(args)
    if args.worker:
        return eval_worker(args)

    settings = dict(SMOKE if args.smoke else FULL)
    settings.update({k: v for k, v in (("workers", args.workers), ("epochs", args.epochs), ("eval_n", args.eval_n)) if v is not None})
    out = Path(args.out) if args.out else HERE / "results"
    if args.smoke and out.resolve() == (HERE / "results").resolve():
        parser.error("a smoke run writes no figures into benchmarks/results: give --out")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped from outside: end the contender, keep the report
    budget = Budget(args.budget)
    report = {"smoke": args.smoke, "command": "python benchmarks/gpu_bench.py " + " ".join(sys.argv[1:]), "machine": machine_info(settings["device"])}
    if not args.smoke and report["machine"]["gpu"] is None:
        parser.error("no CUDA GPU here: run with --smoke to check the logic on the CPU")
    save(report, out)
    try:
        if "train" in args.parts:
            report["train"] = bench_training(settings, budget, args.train_timeout, args.warmup_epochs, args.streaming_row)
            save(report, out)
        if "eval" in args.parts:
            report["eval"] = bench_evaluation(settings, args, device_peaks(report["machine"]["gpu"]), budget)
            save(report, out)
    except SystemExit:
        report["stopped"] = "stopped from outside (SIGTERM) before the end"
        save(report, out)
        raise
    print(markdown(report))


if __name__ == "__main__":
    main()
