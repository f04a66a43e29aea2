"""Index directories: what ``mltk index`` writes and ``mltk search`` reads, self-contained.

An index directory holds a faiss index (``mltk.knn``), the vectors, the image paths and labels,
and the model that embeds queries (see ``write_index_dir``). A folder is replaced only when it is
provably an index directory holding nothing else. A gallery without classes (``load_gallery``) is
indexed with classes.json ``[]`` and every label -1; its search hits have no class.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mltk.embedding import EmbedSettings
from mltk.errors import MltkError, UsageError, first_line
from mltk.knn import KINDS, OPTIONS, Progress, build, check_options, configure, kind_of, neighbours, search, settings
from mltk.outputs import check_dir, check_replaceable, locked_folder, replace_folder, restore_aside
from mltk.rules import Choice, MappingOf, Number, Options, Text, Where, from_file
from mltk.thresholds import Calibration, OperatingPoint

FORMAT = "mltk-index-1"
ENROLLED = "enrolled"  # images added by upload (mltk serve's /enrol) live in the index directory, named by their content


# Everything ``write_index_dir`` puts in an index directory: a folder holding anything else is not
# only an index, and replacing it (a removal of the whole folder) would take the rest with it.
WRITTEN = ("index.faiss", "embeddings.npy", "paths.txt", "labels.npy", "classes.json", "model.pt", "meta.json", "skipped_images.txt", ENROLLED)
META_MAX = 1 << 20  # meta.json holds a few hundred bytes: a larger file of that name is not one
TEXT = Text(r"(?s).*")
#: meta.json, checked whole: what a search relies on (required), then the record of what made it (text when present)
META = Options(
    {
        "format": Choice((FORMAT,)),
        "kind": Choice(tuple(KINDS)),
        "metric": Choice(("inner_product",)),
        "dim": Number(1, whole=True),
        "count": Number(1, whole=True),
        "params": MappingOf(Number(-(2**63), 2**63 - 1, whole=True, what="a whole number")),
        **{key: TEXT for key in ("run", "data", "model", "mltk_version", "faiss_version", "torch_version", "created", "modified", "operating_point")},
        "calibration": Where(lambda v: isinstance(v, dict), what="a calibration (what thresholds.json holds)"),  # checked by calibration_of
    },
    required=("format", "kind", "metric", "dim", "count", "params"),
    empty_ok=False,
)


@dataclass
class IndexDir:
    """An index directory, opened: the faiss index, what row i is (path, label), and meta.json; an unlabelled
    gallery's classes are [] and its labels -1."""

    path: Path
    index: object
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    meta: dict

    @property
    def model_file(self) -> Path:
        return self.path / "model.pt"


def read_meta(path: Path, fmt: str = FORMAT) -> dict | None:
    """meta.json of ``path`` when it names the format ``fmt`` (the proof that mltk wrote the folder), else None."""
    try:
        with open(path / "meta.json", "rb") as f:
            text = f.read(META_MAX + 1)
        meta = json.loads(text) if len(text) <= META_MAX else None
    except (OSError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == fmt else None


def load_gallery(spec: str, unlabelled: bool = False):
    """The gallery ``mltk index`` takes: what ``mltk.data.load_data`` reads, or images without classes.

    A folder whose images all lie directly in it is a gallery without classes: no name could be a class.
    With ``unlabelled``, so is every image under a folder, its subfolders not taken for classes (dates,
    batches). A folder with images both directly in it and in subfolders is refused rather than guessed:
    read as class folders, the ones at its top would be left out.
    """
    from mltk.data import IMAGE_SUFFIXES, load_data, unlabelled_folder

    path = Path(spec)
    if unlabelled:
        if not path.is_dir():
            raise UsageError(f"--unlabelled takes a folder of images; --data {spec!r} is not a folder")
        return unlabelled_folder(path)
    if not path.is_dir() or not any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".") for p in path.iterdir()):
        return load_data(spec)
    gallery = unlabelled_folder(path)
    nested = next((p for p in gallery.sources if p.parent != path), None)
    if nested is not None:
        raise MltkError(
            f"--data {spec!r} holds images directly in it and in subfolders ({str(nested)!r}): give --unlabelled to index "
            "them all without classes, or move the ones at its top into class folders"
        )
    return gallery


@dataclass(frozen=True)
class IndexRequest:
    """What ``mltk index`` is asked for, as its options name it; ``check`` holds it together before the model loads."""

    run: Path  # a run directory or checkpoint file
    data: str  # the gallery: what ``load_gallery`` reads
    out: Path  # the index directory to write
    kind: str = "flat"
    options: dict = field(default_factory=dict)  # of the kind (``knn.OPTIONS``), those given: nlist, nprobe, pq_m, m, ef_search
    unlabelled: bool = False
    calibrate: str | None = None  # an evaluation of the model, or images (``mltk.calibrate.resolve``)
    far: float | str | None = None  # the operating point of ``calibrate``
    embed: EmbedSettings = EmbedSettings()

    def check(self) -> "IndexRequest":
        """One line for options that contradict each other or are out of range, and for an ``out`` that is not mltk's
        to replace (``check_request``): before the model loads, a mistake costs nothing."""
        wrong = sorted(set(self.options) - set(OPTIONS.get(self.kind, self.options)))  # an unknown kind: check_request says so
        if wrong:
            named = ", ".join("--" + k.replace("_", "-") for k in wrong)
            raise UsageError(f"{named}: not an option of --kind {self.kind} (ivf: --nlist, --nprobe; ivfpq: those and --pq-m; hnsw: --m, --ef-search)")
        if self.far is not None and self.calibrate is None:
            raise UsageError("--far picks an operating point of --calibrate; give --calibrate EVAL_DIR_OR_DATA too")
        inputs = {"RUN": self.run, "--data": self.data, "--calibrate": self.calibrate}
        check_request(self.out, self.kind, self.embed.batch_size, self.embed.workers, inputs=inputs, **self.options)
        return self

    def load(self):
        """The model and the gallery: what ``write`` indexes."""
        from mltk.model import load

        return load(self.run, self.embed.device), load_gallery(self.data, self.unlabelled)

    def write(self, model, gallery, progress: Progress | None = None) -> tuple[IndexDir, list]:
        """``write_index_dir`` of ``gallery``, embedded with ``model``, as asked."""
        return write_index_dir(
            model, gallery, self.out, self.kind, run=str(Path(self.run).resolve()), batch_size=self.embed.batch_size,
            workers=self.embed.workers, progress=progress, calibrate=self.calibrate, far=self.far, **self.options,
        )


def check_request(out: str | Path, kind: str = "flat", batch_size: int = 128, workers: int = 2, inputs: dict | None = None, **options) -> Path:
    """What ``write_index_dir`` can check before the model loads: the kind, sizes, options and ``out``.

    Returns where the index will be written: ``out`` made absolute (a symbolic link: the folder it
    names). ``out`` is new, an empty folder, or an index mltk wrote that holds nothing else, and is none
    of the command's ``inputs`` (``{role: path}``) nor holds one (``mltk.outputs.check_replaceable``);
    anything else is refused and left as it is.
    """
    check_options(kind, **options)
    for name, value, least in (("batch_size", batch_size, 1), ("workers", workers, 0)):
        if value < least:
            raise UsageError(f"{name}={value}: it is at least {least}")
    given = str(out)
    check_dir(out)
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        try:
            out = out.resolve(strict=True)
        except (OSError, RuntimeError):
            raise MltkError(f"--out {given!r} is a symbolic link to nowhere; give a folder") from None
    check_dir(out.parent, f"the folder of --out {given!r}")  # the index is made beside it, then renamed
    check_index_replaceable(out, given, inputs)
    return out


def check_index_replaceable(out: Path, given: str, inputs: dict | None = None) -> None:
    """mltk replaces only what it wrote, never its own input: ``out`` (as ``given``) is none of ``inputs`` and only an index."""
    check_replaceable(given, inputs, mine=lambda path: _not_only_an_index(out, given), advice="give a new or empty folder")


def _not_only_an_index(out: Path, given: str) -> str | None:
    """None when ``out`` is absent, empty, or an mltk index and nothing else (what may be removed to put a new index
    there); else what it holds instead."""
    if not out.is_dir():
        return None
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as exc:
        raise MltkError(f"cannot read --out {given!r}: {exc.strerror}") from None
    if entries and read_meta(out) is None:
        return f"is a folder that is not an mltk index (it holds {some_of(entries)})"
    foreign = [name for name in entries if name not in WRITTEN]
    if foreign:
        return f"is an mltk index but also holds {some_of(foreign)}, which `mltk index` does not write and replacing the index would delete"
    return None


def some_of(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` names, quoted, and how many more: what a refused folder holds, in a message."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(n) for n in names[:shown]) + more


def write_index_dir(
    model, data, out: str | Path, kind: str = "flat", *, run: str = "", batch_size: int = 128, workers: int = 2,
    progress: Progress | None = None, calibrate: str | Path | None = None, far: float | str | None = None, **options,
) -> tuple[IndexDir, list]:
    """Embed ``data`` with ``model`` and write the index directory ``out``; returns it and the unreadable images left out.

    ``out`` holds index.faiss, embeddings.npy (row i = line i of paths.txt), paths.txt, labels.npy,
    classes.json, model.pt (a slim mltk checkpoint: ``mltk.load(out / "model.pt")`` works), meta.json
    and, when images were left out, skipped_images.txt. It is built in a temporary sibling and
    renamed into place, so ``out`` is never half-written; an earlier index there is replaced, a
    folder holding anything else is refused (``check_request``). Temporaries that killed runs left
    beside ``out`` are removed first. ``options`` go to ``build`` (nlist, nprobe, m, ef_construction,
    ef_search, seed). ``calibrate`` (``mltk.calibrate.resolve``: an evaluation of this model, or images)
    puts the match threshold at ``far`` into meta.json, for ``search_images`` to say "no match".
    """
    import faiss
    import torch

    from mltk import __version__
    from mltk.config import to_dict
    from mltk.data import readable, write_skipped
    from mltk.embedding import embed
    from mltk.checkpoint import save_checkpoint

    given = str(out)
    out = check_request(out, kind, batch_size, workers, **options)
    skipped: list = []
    data = readable(data, skipped)
    check_options(kind, len(data), model.embedder.dim, **options)
    paths = image_paths(data)
    calibration = None
    if calibrate is not None:  # before the gallery is embedded: a wrong source costs nothing
        from mltk.calibrate import resolve

        calibration = resolve(model, calibrate, far, settings=EmbedSettings(batch_size, workers), progress=progress)
    with replace_folder(out, f"index directory {given!r}", "nothing there was changed", recheck=lambda: check_index_replaceable(out, given), exclusive=True) as tmp:
        vectors = embed(model, data, batch_size, workers, progress=progress, out=tmp / "embeddings.npy")
        index = build(vectors, kind, progress=progress, **options)
        faiss.write_index(index, str(tmp / "index.faiss"))
        (tmp / "paths.txt").write_text("".join(p + "\n" for p in paths), encoding="utf-8", errors="surrogateescape")
        np.save(tmp / "labels.npy", np.asarray(data.labels, np.int64))
        (tmp / "classes.json").write_text(json.dumps(list(data.classes)))
        weights = {k: v.detach().cpu() for k, v in model.embedder.state_dict().items()}
        config = to_dict(model.config) if model.config is not None else None
        save_checkpoint({"config": config, "data_config": model.data_config, "classes": model.classes, "model": weights}, tmp / "model.pt")
        if skipped:
            write_skipped(tmp / "skipped_images.txt", skipped)
        meta = {
            "format": FORMAT, "kind": kind, "metric": "inner_product", "dim": int(vectors.shape[1]), "count": len(paths),
            "params": settings(index), "run": str(run), "data": data.name, "model": model.fingerprint(), "mltk_version": __version__,
            "faiss_version": faiss.__version__, "torch_version": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if calibration is not None:
            meta.update(calibration=calibration[0].to_json(), operating_point=calibration[1].name)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        del vectors  # the memmap: closed before the folder moves
    return IndexDir(out, index, paths, np.asarray(data.labels, np.int64), list(data.classes), meta), skipped


def image_paths(data) -> list[str]:
    """Line i of paths.txt: image i's absolute path; one with a line break in its name cannot be a line."""
    paths = [str(Path(s).resolve()) if isinstance(s, (str, Path)) else f"{data.name}[{i}]" for i, s in enumerate(data.sources)]
    broken = next((p for p in paths if "\n" in p), None)
    if broken is not None:
        raise MltkError(f"image {broken!r} has a line break in its path, and paths.txt holds one path a line; rename it")
    return paths


def open_index_dir(path: str | Path, locked: bool = True) -> IndexDir:
    """An index directory written by ``write_index_dir``, checked whole; a problem is one line naming its file.

    Every file is untrusted: each must agree with meta.json (kind, dimensions, count), labels.npy is
    a 1-D integer array read without pickles, and every label names a class of classes.json (a
    gallery without classes: classes.json is [] and every label -1).
    embeddings.npy, which a search does not read, is checked (its header) only when it is there: it
    may be deleted to save space. model.pt is checked when ``search_images`` loads it.
    The files are read as one version: an edit swapping the folder meanwhile waits (``locked_folder``), unless the
    caller holds it already (``locked=False``: an edit reading what it changes). An earlier version that a killed
    edit left aside, with nothing in its place, is put back first.
    """
    import faiss

    path = Path(path)
    if not os.path.lexists(path):
        try:
            restore_aside(path)  # an edit killed between its two renames (a system without renameat2) left it aside
        except OSError:
            pass
    if not path.is_dir():
        where = "is a file, not a folder" if path.exists() else "does not exist"
        raise MltkError(f"index directory {str(path)!r} {where}; write one with `mltk index RUN --data GALLERY --out DIR`")
    with locked_folder(path) if locked else nullcontext():
        return _read_index_dir(path, faiss)


def _read_index_dir(path: Path, faiss) -> IndexDir:
    meta = read_meta(path)
    if meta is None:
        raise MltkError(f"{str(path)!r} is not an mltk index directory (no meta.json of format {FORMAT})")
    _check_meta(path, meta)
    calibration_of(path, meta)
    dim, count = meta["dim"], meta["count"]
    for name in ("index.faiss", "paths.txt", "labels.npy", "classes.json", "model.pt"):
        if not (path / name).is_file():
            raise _damaged(path, name, "is missing")
    try:
        index = faiss.read_index(str(path / "index.faiss"))
    except RuntimeError as exc:
        raise _damaged(path, "index.faiss", f"cannot be read by faiss ({first_line(exc)})") from None
    found = {"kind": kind_of(index), "dim": index.d, "count": index.ntotal}
    for key, value in found.items():
        if value != meta[key]:
            raise _damaged(path, "index.faiss", f"has {key} {value}; meta.json says {meta[key]}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise _damaged(path, "index.faiss", "does not rank by inner product")
    paths = _read_paths(path, count)
    classes = _read_classes(path)
    labels = _read_labels(path, count, len(classes))
    if (path / "embeddings.npy").exists():
        shape, dtype = _npy_header(path, "embeddings.npy")
        if shape != (count, dim) or dtype != np.float32:
            raise _damaged(path, "embeddings.npy", f"holds {dtype} {shape}; expected float32 ({count}, {dim})")
    return IndexDir(path, index, paths, labels, classes, meta)


AGAIN = "write it again with `mltk index`"


def _damaged(path: Path, name: str, problem: str) -> MltkError:
    return MltkError(f"index directory {str(path)!r} is damaged: {name} {problem}; {AGAIN}")


def _check_meta(path: Path, meta: dict) -> None:
    from_file(META, meta, "meta.json", f"index directory {str(path)!r} is damaged", AGAIN)


def calibration_of(path: Path, meta: dict) -> tuple[Calibration, OperatingPoint] | None:
    """The index's calibration and chosen operating point (meta.json's ``calibration``, ``operating_point``), checked; None if uncalibrated."""
    from mltk import thresholds

    if "calibration" not in meta and "operating_point" not in meta:
        return None
    calibration = thresholds.from_json(meta.get("calibration"), f"index directory {str(path)!r} is damaged: meta.json", AGAIN)
    name = meta.get("operating_point")
    point = next((p for p in calibration.points if p.name == name), None)
    if point is None or point.threshold is None:
        raise _damaged(path, "meta.json", f"has operating_point={reprlib.repr(name)}, not a point of its calibration with a threshold")
    return calibration, point


def _read_paths(path: Path, count: int) -> list[str]:
    """paths.txt, a path a line: split at line feeds only (``splitlines`` would also split at characters a file name may hold)."""
    try:
        lines = (path / "paths.txt").read_bytes().decode("utf-8", errors="surrogateescape").split("\n")
    except OSError as exc:
        raise _damaged(path, "paths.txt", f"cannot be read ({exc.strerror})") from None
    if lines[-1] == "":
        lines.pop()
    if len(lines) != count:
        raise _damaged(path, "paths.txt", f"has {len(lines)} lines; meta.json says {count} images")
    return lines


def _read_classes(path: Path) -> list[str]:
    """classes.json: a list of class names, or [] for a gallery without classes."""
    try:
        classes = json.loads((path / "classes.json").read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise _damaged(path, "classes.json", f"is not JSON ({first_line(exc)})") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise _damaged(path, "classes.json", f"holds {reprlib.repr(classes)}; expected a list of class names (strings)")
    return classes


def _read_labels(path: Path, count: int, classes: int) -> np.ndarray:
    """labels.npy: each label names a class of classes.json; without classes, every label is -1."""
    shape, dtype = _npy_header(path, "labels.npy")
    if shape != (count,) or dtype.kind not in "iu":
        raise _damaged(path, "labels.npy", f"holds {dtype} {shape}; expected integers ({count},)")
    try:
        labels = np.load(path / "labels.npy", allow_pickle=False).astype(np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise _damaged(path, "labels.npy", f"cannot be read ({first_line(exc)})") from None
    if not classes:
        labelled = np.flatnonzero(labels != -1)
        if len(labelled):
            raise _damaged(path, "classes.json", f"holds [] (a gallery without classes) but labels.npy has label {labels[labelled[0]]} at row {labelled[0]}; without classes every label is -1")
        return labels
    outside = np.flatnonzero((labels < 0) | (labels >= classes))
    if len(outside):
        raise _damaged(path, "labels.npy", f"has label {labels[outside[0]]} at row {outside[0]}; classes.json names {classes} classes (0 to {classes - 1})")
    return labels


def _npy_header(path: Path, name: str) -> tuple[tuple, np.dtype]:
    """Shape and dtype of an .npy file, read from its header and checked against its size: a forged header allocates nothing."""
    from numpy.lib import format as npy

    try:
        with open(path / name, "rb") as f:
            version = npy.read_magic(f)
            read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
            if read is None:
                raise ValueError(f"npy format version {version}")
            shape, _, dtype = read(f)
            data = os.fstat(f.fileno()).st_size - f.tell()
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise _damaged(path, name, f"is not a numpy array file ({first_line(exc)})") from None
    if dtype.hasobject:
        raise _damaged(path, name, "holds Python objects, not numbers")
    if data != math.prod(shape) * dtype.itemsize:
        raise _damaged(path, name, f"holds {data} bytes of data; its header announces {dtype} {shape}")
    return shape, dtype


def search_images(
    index_dir: str | Path, images: list[str | Path], k: int = 5, *, nprobe: int | None = None, ef_search: int | None = None,
    device: str | None = None, batch_size: int = 64, workers: int = 0, far: float | str | None = None, rerank: str | None = None,
) -> list[dict]:
    """The k nearest gallery images of each query image: [{query, match, threshold, neighbours: [{rank, path, label, class, score, match}]}];
    label and class are None for a gallery without classes.

    A hit matches when its cosine score reaches the index's calibrated threshold (``far``: another of its operating
    points), and a query when one of its hits does; without a calibration both are None. ``rerank`` (a re-ranker
    spec, ``mltk.rerank``) re-orders each query's nearest; the scores stay the cosine similarities.
    """
    from mltk.data import LabelledImages
    from mltk.embedding import embed
    from mltk.rerank import create as create_reranker

    opened = open_index_dir(index_dir)
    if not 1 <= k <= opened.index.ntotal:
        raise UsageError(f"k={k}: give 1 to {opened.index.ntotal}, the number of images in the index")
    configure(opened.index, nprobe, ef_search)
    reranker = create_reranker(rerank)  # a misspelt re-ranker or parameter fails before any work
    threshold = operating_point(opened, far)
    check_images(images, "query image")
    model = load_model(opened, device)
    vectors = embed(model, LabelledImages(list(images), [0] * len(images), ["?"]), batch_size, workers)
    sims, positions = _searched(opened, vectors, k, reranker)
    labelled = bool(opened.classes)  # a gallery without classes: its hits have no label or class (null in JSON)
    results = []
    for i, image in enumerate(images):
        neighbours_ = [
            {
                "rank": r + 1, "path": opened.paths[p], "label": int(opened.labels[p]) if labelled else None,
                "class": opened.classes[opened.labels[p]] if labelled else None, "score": float(s),
                "match": None if threshold is None else bool(s >= threshold.threshold),
            }
            for r, (s, p) in enumerate(zip(sims[i], positions[i]))
        ]
        match = None if threshold is None else any(n["match"] for n in neighbours_)
        shown = None if threshold is None else {"score": threshold.threshold, "operating_point": threshold.name}
        results.append({"query": str(image), "match": match, "threshold": shown, "neighbours": neighbours_})
    return results


def check_images(images: list[str | Path], what: str) -> None:
    """Each image file exists and decodes, before any model loads; else one line naming it."""
    from mltk.data import check_image

    for image in images:
        problem = _not_an_image(Path(image)) or check_image(image)
        if problem:
            raise MltkError(f"{what} {str(image)!r} cannot be read: {problem}")


def load_model(opened: IndexDir, device: str | None = None):
    """The index's model.pt, checked against the index: its dimensions, the model that embedded the gallery (meta.json's
    ``model`` fingerprint; an index of mltk before it was recorded has none, and only its calibration's is checked), and
    the model its threshold was calibrated for."""
    from mltk.model import load

    model = load(opened.model_file, device)
    if model.embedder.dim != opened.meta["dim"]:
        raise _damaged(opened.path, "model.pt", f"embeds in {model.embedder.dim} dimensions; the index holds {opened.meta['dim']}")
    fingerprint = model.fingerprint()
    if opened.meta.get("model", fingerprint) != fingerprint:
        raise _damaged(opened.path, "model.pt", "is not the model that embedded the gallery (other weights or preprocessing than meta.json records)")
    calibrated = calibration_of(opened.path, opened.meta)
    if calibrated is not None and calibrated[0].model != fingerprint:
        raise _damaged(opened.path, "model.pt", "is not the model its threshold was calibrated for")
    return model


def operating_point(opened: IndexDir, far: float | str | None) -> OperatingPoint | None:
    """The operating point a search uses: the index's, or its point at ``far``; None for an uncalibrated index."""
    calibrated = calibration_of(opened.path, opened.meta)
    if calibrated is None:
        if far is not None:
            raise UsageError(f"index {str(opened.path)!r} has no calibrated threshold, so --far has nothing to choose from; write it with `mltk index --calibrate`")
        return None
    point = calibrated[0].at(far) if far is not None else calibrated[1]
    if point.threshold is None:
        raise UsageError(f"the index's calibration has no threshold at {point.name.replace('far=', 'FAR ')}; choose a higher --far")
    return point


def _searched(opened: IndexDir, vectors: np.ndarray, k: int, reranker) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of each vector; with a re-ranker, its candidates re-ordered first (it reads embeddings.npy)."""
    if reranker is None or not reranker.candidates:  # none (candidates 0) re-orders nothing: embeddings.npy is not needed
        return neighbours(opened.index, vectors, k)
    from mltk.rerank import Candidates

    if not (opened.path / "embeddings.npy").is_file():
        raise MltkError(f"re-ranking reads the gallery's vectors, and index directory {str(opened.path)!r} has no embeddings.npy; write it again with `mltk index`")
    wanted = max(k, min(int(reranker.candidates), opened.index.ntotal))
    sims, positions = neighbours(opened.index, vectors, wanted)
    gallery = np.load(opened.path / "embeddings.npy", mmap_mode="r", allow_pickle=False)
    more = lambda v, kk: search(opened.index, v, kk)  # noqa: E731  (more lists, from the same index)
    sims, positions = reranker(Candidates(vectors, gallery, sims, positions, own=None, search=more))
    return sims[:, :k], positions[:, :k]


def _not_an_image(path: Path) -> str | None:
    if path.is_dir():
        return "it is a folder, not an image file"
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "it is not a regular file"
    return None
