"""Embeddings folders: what ``mltk embed`` writes, the vectors of a set of images with their paths, for other programs.

The folder holds embeddings.npy (float32, N x dim, L2-normalised: a dot product is a cosine similarity),
paths.txt (line i: the absolute path of row i's image, as an index directory writes it), meta.json (the
model's fingerprint, the run and the data, the count) and, when images could not be read, skipped_images.txt
(they are left out, and listed there).

.npy and a text file rather than Parquet: numpy reads them with nothing else installed, ``np.load(path,
mmap_mode="r")`` maps a set larger than memory without reading it, and they are the files an index directory
and ``mltk evaluate --save-embeddings`` already hold. A folder rather than one file: the vectors, their paths
and meta.json are made aside and renamed into place together, and meta.json is the proof that ``mltk embed``
wrote the folder, the only kind of folder it replaces.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mltk.errors import MltkError, UsageError
from mltk.index import image_paths, read_meta, some_of
from mltk.outputs import check_dir, check_replaceable, replace_folder

FORMAT = "mltk-embeddings-1"
WRITTEN = ("embeddings.npy", "paths.txt", "meta.json", "skipped_images.txt")  # all that a folder of ``mltk embed`` holds


@dataclass
class Embedded:
    """An embeddings folder, written: its vectors (a read-only memory map), row i's image path, and meta.json."""

    path: Path
    vectors: np.ndarray
    paths: list[str]
    meta: dict


def load_images(spec: str):
    """DATA of ``mltk embed``: every image under a folder (classes do not matter here), else what ``load_data`` reads."""
    from mltk.data import load_data, unlabelled_folder

    return unlabelled_folder(Path(spec)) if Path(spec).is_dir() else load_data(spec)


def check_request(out: str | Path, batch_size: int = 128, workers: int = 2, inputs: dict | None = None) -> Path:
    """What ``write_embeddings`` checks before the model loads; returns ``out`` resolved (a link: the folder it names).

    ``out`` is new, an empty folder, or a folder ``mltk embed`` wrote holding nothing else, and none of the
    command's ``inputs`` (``{role: path}``) nor holds one (``mltk.outputs.check_replaceable``); else one line.
    """
    for name, value, least in (("batch_size", batch_size, 1), ("workers", workers, 0)):
        if value < least:
            raise UsageError(f"{name}={value}: it is at least {least}")
    check_dir(out)
    check_replaceable(out, inputs, mine=_not_only_embeddings, advice="give a new or empty folder")
    return Path(out).resolve()


def _not_only_embeddings(out: Path) -> str | None:
    """None when ``out`` is absent, empty, or a folder ``mltk embed`` wrote and nothing else; else what it holds instead."""
    if not out.is_dir():
        return None
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as exc:
        raise MltkError(f"cannot read --out {str(out)!r}: {exc.strerror}") from None
    if entries and read_meta(out, FORMAT) is None:
        return f"is a folder that `mltk embed` did not write (it holds {some_of(entries)})"
    foreign = [name for name in entries if name not in WRITTEN]
    if foreign:
        return f"was written by `mltk embed` but also holds {some_of(foreign)}, which replacing it would delete"
    return None


def write_embeddings(
    model, data, out: str | Path, *, run: str = "", source: str = "", batch_size: int = 128, workers: int = 2, progress=None,
) -> tuple[Embedded, list]:
    """Embed ``data`` with ``model`` into the folder ``out``; returns it and the unreadable images, left out.

    The vectors come from ``mltk.embedding.embed``, the loop of ``mltk evaluate`` and ``mltk index``:
    row i is ``mltk.load(run).embed(paths[i])``. ``run`` and ``source`` (the data as the user named it;
    default ``data.name``) are recorded in meta.json. An earlier ``mltk embed`` folder in ``out`` is
    replaced whole; ``out`` is never half-written.
    """
    import torch

    from mltk import __version__
    from mltk.data import readable, write_skipped
    from mltk.embedding import embed

    given = str(out)
    out = check_request(out, batch_size, workers)
    skipped: list = []
    data = readable(data, skipped)
    paths = image_paths(data)  # a path with a line break is refused before any embedding
    recheck = lambda: check_replaceable(given, mine=lambda _: _not_only_embeddings(out), advice="give a new or empty folder")  # noqa: E731  (files put there meanwhile are the user's)
    with replace_folder(out, f"embeddings folder {given!r}", "nothing there was changed", recheck=recheck) as tmp:
        vectors = embed(model, data, batch_size, workers, progress=progress, out=tmp / "embeddings.npy")
        (tmp / "paths.txt").write_text("".join(p + "\n" for p in paths), encoding="utf-8", errors="surrogateescape")
        if skipped:
            write_skipped(tmp / "skipped_images.txt", skipped)
        meta = {
            "format": FORMAT, "count": len(paths), "dim": int(vectors.shape[1]), "model": model.fingerprint(), "run": str(run),
            "data": source or data.name, "skipped": len(skipped), "mltk_version": __version__, "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        del vectors  # the memmap: closed before the folder moves
    return Embedded(out, np.load(out / "embeddings.npy", mmap_mode="r"), paths, meta), skipped
