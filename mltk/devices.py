"""Which torch device a command runs on: one resolver for training, inference and the metrics pass.

torch is imported when a device is resolved, not with this module: ``mltk --help`` costs no torch."""

from mltk.errors import UsageError


def resolve_device(requested: str | None = "auto", local_rank: int = 0, distributed: bool = False):
    """``requested`` as a ``torch.device``, checked against this machine.

    ``auto`` (or None): the GPU when torch sees one (the process's own, ``cuda:LOCAL_RANK``, under torchrun),
    else the CPU. A plain ``cuda`` in a ``distributed`` run is the process's own GPU too. A device torch does
    not know, or one this machine lacks, is one line (UsageError) before any work.
    """
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested in (None, "auto"):
        return torch.device("cuda", local_rank % gpus) if gpus else torch.device("cpu")
    try:
        chosen = torch.device(requested)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {requested!r} is not a device torch knows; give cpu, cuda, cuda:1, mps, ...") from None
    if chosen.type == "cuda" and distributed and chosen.index is None:
        chosen = torch.device("cuda", local_rank)
    if chosen.type == "cuda" and (chosen.index or 0) >= gpus:
        raise UsageError(f"--device {requested!r}: there is no such CUDA GPU here ({gpus} found); give --device cpu")
    backend = getattr(torch.backends, "mps", None) if chosen.type == "mps" else getattr(torch, "xpu", None) if chosen.type == "xpu" else None
    if chosen.type in ("mps", "xpu") and not (backend is not None and backend.is_available()):
        raise UsageError(f"--device {requested!r}: {chosen.type.upper()} is not available here; give --device cpu")
    return chosen
