"""Embedding a set of images: the one loop behind validation in ``mltk run``, ``mltk evaluate``,
``mltk index`` and ``EmbeddingModel.embed``.

Precision, chosen here once: embeddings are computed in float32 with autocast off, whatever
precision training used (``amp`` speeds up the training steps only), and on a GPU with cuDNN's
TF32 convolutions off (PyTorch's default lets them round inputs to 10 bits of mantissa, so that a
GPU's embeddings would differ from the CPU's by about 1e-3). So the validation recall@1 in
metrics.jsonl and ``mltk evaluate``'s recall@1 of the same checkpoint are one computation on the
same vectors. The model is put in eval mode first (BatchNorm's running statistics, no dropout).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mltk import distributed
from mltk.data import ImageDataset, LabelledImages, check_image, describe_files
from mltk.distributed import World
from mltk.errors import MltkError, UsageError, is_out_of_memory, out_of_memory
from mltk.outputs import replace_file

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class EmbedSettings:
    """How a command embeds its images (evaluate, index, search, calibrate, verify): one set of options, one check."""

    batch_size: int = 128  # images per batch
    workers: int = 2  # data-loading processes (0: load in this process)
    device: str | None = None  # auto (None), cpu, cuda, cuda:1 ...
    flip_tta: bool = False  # average each embedding with the mirrored image's

    def check(self) -> "EmbedSettings":
        """Numbers in range, before any work: one line naming the option."""
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be a positive number of images, got {self.batch_size}")
        if self.workers < 0:
            raise UsageError(f"--workers must be 0 (load in this process) or more processes, got {self.workers}")
        return self


def float32_convolutions():
    """cuDNN's convolutions in full float32 inside the block (no TF32), its other settings as they are."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False)


@torch.no_grad()
def embed_batch(embedder: torch.nn.Module, images: torch.Tensor, flip_tta: bool = False) -> torch.Tensor:
    """One preprocessed batch (on the embedder's device) to L2-normalised float32 embeddings, as every mltk loop embeds:
    autocast off, float32 convolutions; ``flip_tta`` averages with the mirrored images'."""
    with torch.autocast(images.device.type, enabled=False), float32_convolutions():
        vectors = embedder.embed(images)
        if flip_tta:
            vectors = torch.nn.functional.normalize(vectors + embedder.embed(images.flip(-1)), dim=1)
    return vectors


def embed_dataset(
    embedder: torch.nn.Module, dataset, device: torch.device, batch_size: int = 128, workers: int = 2, flip_tta: bool = False,
    progress: Progress | None = None, into: np.ndarray | None = None, world: World = World(),
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised float32 embeddings of every item of ``dataset``, in order, and the positions of the items that failed to decode.

    ``dataset`` yields ``(image, label, failed)`` as ``mltk.data.ImageDataset`` does; a failed
    item's row embeds a blank image: the caller drops or reports it. ``embedder`` is an
    ``mltk.model.Embedder`` (its ``embed`` L2-normalises). ``into`` (an array or a writable memory
    map, len(dataset) x dim) is filled batch by batch; without it a new array is. ``flip_tta``
    averages each embedding with the mirrored image's. Started by torchrun (``world``), each
    process embeds every world.size-th item and every process gets the whole set back.
    """
    embedder.eval()
    target = into if into is not None else np.zeros((len(dataset), embedder.dim), np.float32)
    mine = list(range(world.rank, len(dataset), world.size))
    shard = dataset if not world.distributed else torch.utils.data.Subset(dataset, mine)
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=workers)
    kept, failed, done = [], [], 0  # kept: this process's vectors, gathered at the end across processes
    for images, _, bad in loader:
        images = images.to(device, non_blocking=True)
        vectors = embed_batch(embedder, images, flip_tta)
        if world.distributed:
            kept.append(vectors)
        else:
            target[done : done + len(images)] = vectors.cpu().numpy()
        failed.append(bad)
        done += len(images)
        if progress:
            progress("embedding", done, len(shard))
    failed = torch.cat(failed) if failed else torch.empty(0, dtype=torch.long)
    if world.distributed:
        vectors = torch.cat(kept) if kept else torch.empty((0, embedder.dim), device=device)
        positions = torch.tensor(mine, dtype=torch.long, device=device)
        vectors, failed, positions = (distributed.gather_rows(t, world).cpu() for t in (vectors, failed.to(device), positions))
        target[positions.numpy()] = vectors.numpy()
    return target, np.sort(failed[failed >= 0].numpy())


def embed(
    model, data: LabelledImages, batch_size: int = 128, workers: int = 2, flip_tta: bool = False,
    progress: Progress | None = None, out: str | Path | None = None,
) -> np.ndarray:
    """Embeddings of every image of ``data`` with an ``mltk.model.EmbeddingModel`` and its preprocessing, in order.

    Every image must decode (one that passed the scan and fails now has changed since: metrics on
    stand-in images would be wrong), else one line names them. With ``out`` (an .npy file) each
    batch is written to disk as it comes, and the file comes back as a read-only memory map: a set
    larger than memory can be embedded and evaluated. The file is written under a temporary name
    and renamed at the end, so a failed run leaves no partial file under ``out``.
    """
    dataset = ImageDataset(data, model.transform, model.mode)
    shape = (len(data), model.embedder.dim)

    def run(into: np.ndarray | None) -> np.ndarray:
        try:
            vectors, failed = embed_dataset(model.embedder, dataset, model.device, batch_size, workers, flip_tta, progress, into)
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise out_of_memory(exc, f"lower --batch-size (now {batch_size})") from None
        if len(failed):
            files = [(data.sources[i], check_image(data.sources[i]) or "failed to decode") for i in failed]
            raise MltkError(f"{len(files)} images could not be read while embedding: {describe_files(files)}")
        return vectors

    if out is None:
        return run(None)
    out = Path(out)
    with replace_file(out) as tmp:
        if len(data):
            vectors = run(np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape))
            vectors.flush()
            del vectors  # unmapped before the rename
        else:  # numpy cannot map an empty array
            with open(tmp, "wb") as f:
                np.save(f, np.zeros(shape, np.float32))
    return np.load(out, mmap_mode="r") if len(data) else np.load(out)
