"""Tests see mltk's built-ins only, unless a test installs a plugin on purpose (in a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

os.environ["MLTK_LOAD_PLUGINS"] = ""  # read by mltk.plugins.load_plugins(), which runs at the first lookup
# mltk's consoles are made when mltk.cli.output is first imported, and a COLUMNS set then fixes their width for good
# (pytest-xdist's workers have one): unset, the width follows each test's own COLUMNS, 80 without one.
os.environ.pop("COLUMNS", None)
# pytest-xdist runs a worker per core: each worker, and the mltk processes its tests start, get their share of the
# cores, not one thread per core each (2 workers with 2 threads apiece on 2 cores spend a third of the suite waiting).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` (tests/test_gpu.py, run with ``pytest -m gpu``) are skipped without a CUDA GPU,
    unless MLTK_GPU_TEST_DEVICE=cpu asks for their CPU dry run (see tests/test_gpu.py)."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests or os.environ.get("MLTK_GPU_TEST_DEVICE", "cuda") == "cpu":
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False (MLTK_GPU_TEST_DEVICE=cpu runs a CPU dry run)")
    for item in gpu_tests:
        item.add_marker(skip)


def run_mltk(*args: str, env: dict | None = None, cwd: str | Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m mltk ARGS`` in a fresh process; plugin loading follows ``env`` (None unsets)."""
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-m", "mltk", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout
    )


def install_plugin(name: str, target: Path) -> Path:
    """plugins/NAME installed with pip into ``target`` (a folder of its own: the machine's site-packages stays as it is).

    pip builds a local project in its folder (build/, *.egg-info): it builds a copy here, so that tests on other
    workers installing the same plugin at the same moment never read each other's half-written build."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        source = shutil.copytree(REPO / "plugins" / name, Path(scratch) / name, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
            check=True, capture_output=True,
        )
    return target


@pytest.fixture
def mltk_cli():
    return run_mltk


def make_image_folder(root: Path, classes: int = 8, per_class: int = 4, size: int = 24, mode: str = "RGB", seed: int = 0) -> Path:
    """A tiny ImageFolder tree: each class a colour/stripe pattern plus noise; a stray file at the root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.zeros((size, size, 3), dtype=np.float32)
        base[..., c % 3] = 120 + 15 * c
        base[(c * 3) % size : (c * 3) % size + 3, :, :] = 255
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype("uint8")
            image = Image.fromarray(pixels)
            (image.convert("L") if mode == "L" else image).save(folder / f"{i}.png")
    (root / "README.txt").write_text("not an image class")
    return root


TINY = dict(backbone="test_resnet", image_size=32, dim=16, batch_size=8, m_per_class=2, workers=0, epochs=1, seed=0)  # a run in seconds


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run trained on 7 classes of synthetic images, 3 more held out: (run directory, image folder)."""
    from mltk.config import make_config
    from mltk.train import train

    root = tmp_path_factory.mktemp("run")
    folder = make_image_folder(root / "images", classes=10, per_class=4)
    train(make_config({**TINY, "data": str(folder), "val_classes": 0.3}), root / "run")
    return root / "run", folder


@pytest.fixture
def plugin():
    """``plugin(obj, name)`` registers a plugin object for one test; afterwards it is unregistered and its errors forgotten.

    The built-ins are loaded first, so they come first, as they do for an installed plugin.
    """
    from mltk.plugins import errors, load_plugins, pm

    load_plugins()
    added = []

    def add(obj, name):
        pm.register(obj, name=name)
        added.append(name)
        return obj

    yield add
    for name in added:
        if pm.has_plugin(name):
            pm.unregister(name=name)
        errors.pop(name, None)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def mltk_main(monkeypatch, capsys):
    """``mltk ARGS`` in this process (torch is already imported, so it is quick): exit code, stdout, stderr."""
    from mltk.cli import main

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["mltk", *map(str, args)])
        with pytest.raises(SystemExit) as stop:
            main()
        captured = capsys.readouterr()
        return stop.value.code or 0, captured.out, captured.err

    return run


def snapshot(root: Path) -> dict[str, str]:
    """Every file, folder and link under ``root`` (and ``root`` itself): relative path -> kind and content hash.

    Two equal snapshots mean nothing was created, removed or changed: what a refused command must leave.
    """
    import hashlib

    root = Path(root)
    found: dict[str, str] = {}
    if not root.exists() and not root.is_symlink():
        return found
    for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = "file " + hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def one_line_error(result, code: int | None = None) -> str:
    """Assert ``result`` (``mltk_main``'s tuple or ``run_mltk``'s CompletedProcess) is a refusal: a non-zero exit
    (``code`` when given), nothing on stdout, exactly one ``error: ...`` line on stderr; returns that line."""
    if isinstance(result, subprocess.CompletedProcess):
        exit_code, out, err = result.returncode, result.stdout, result.stderr
    else:
        exit_code, out, err = result
    assert exit_code != 0 and (code is None or exit_code == code), (exit_code, out, err)
    assert out.strip() == "", out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---- shared by the test files of several modules --------------------------------------------------------------------

TINY_ARGS = ["--backbone", "test_resnet", "--image-size", "32", "--dim", "16", "--batch-size", "8", "--m-per-class", "2", "--workers", "0"]
RUN_ARGS = [*TINY_ARGS, "--seed", "0"]  # TINY as `mltk run` options, but for the epochs


def run_config(data, **overrides):
    """TINY's run config on ``data``."""
    from mltk.config import make_config

    return make_config({**TINY, "data": str(data), **overrides})


def tiny_config(data, **overrides):
    """TINY's run config on ``data``, two epochs of seed 3: what the crash, resume and determinism cases train."""
    return run_config(data, **{"epochs": 2, "seed": 3, **overrides})


def not_an_image(path: Path) -> Path:
    path.write_text("this is not an image")
    return path


def dead_pid() -> int:
    """The id of a process that has ended (a child, reaped: nothing else has that id for now): what a kill -9 leaves in
    a temporary's name."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def cpu_allocator_fails(*args, **kwargs):
    """The CPU allocator's real failure, as on a machine out of memory."""
    import torch

    return torch.empty(2**62, dtype=torch.uint8)


def cuda_allocator_fails(*args, **kwargs):
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB")


def evaluate_forbid_work(monkeypatch):
    """Loading a model or embedding fails the test: a refusal must come before either."""

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the input was checked")

    import mltk.evaluate
    import mltk.model

    monkeypatch.setattr(mltk.model, "load", no_work)
    monkeypatch.setattr(mltk.evaluate, "untrained_model", no_work)
    monkeypatch.setattr(mltk.evaluate, "embed", no_work)


def evaluate_args(run, folder, out, *more):
    return ("evaluate", run, "--data", folder, "--out", out, "--no-report", "--workers", "0", "--metrics", "roc_auc,recall_at_k", *more)


@pytest.fixture(scope="module")
def evaluate_checkpoint(trained_run):
    """The trained run's best.pt, as torch reads it (to be spoilt one field at a time)."""
    import torch

    return torch.load(trained_run[0] / "best.pt", weights_only=True)


def plugins_data_losses(*entries):
    """A plugin object whose register_losses registers each ``(name, factory, description)`` in turn."""
    import mltk

    class Plugin:
        @mltk.hookimpl
        def register_losses(self, register):
            for name, factory, description in entries:
                register(name, factory, description=description)

    return Plugin()


def plugins_data_builder(num_classes=1, embedding_size=1, **kwargs):
    return "built"
