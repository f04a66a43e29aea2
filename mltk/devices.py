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


#: The CPU features that make oneDNN's bf16 convolutions and matmuls faster than float32: (name, torch.cpu's test of
#: it, Linux's /proc/cpuinfo flag). AMX tiles: Intel Sapphire Rapids and later. AVX512-BF16 dot products: AMD Zen 4
#: and Zen 5, Intel Cooper Lake. Without either, bf16 is emulated with float32 arithmetic and runs slower than float32.
BF16_FEATURES = (("AMX", "_is_amx_tile_supported", "amx_bf16"), ("AVX512-BF16", "_is_avx512_bf16_supported", "avx512_bf16"))


def cpu_bf16() -> str | None:
    """The CPU's bf16 dot-product feature (``'AMX'`` or ``'AVX512-BF16'``, the faster first), or None where it has
    neither, or where this torch has no oneDNN to use it.

    torch's own tests answer (they also ask the OS for AMX's tile state); a torch without them gets, on Linux only,
    the flags of /proc/cpuinfo. Any other system without them: None, float32 being the safe side.
    """
    import torch

    if not torch.backends.mkldnn.is_available():
        return None
    for name, test, flag in BF16_FEATURES:
        asked = getattr(torch.cpu, test, None)
        if asked() if asked is not None else flag in cpu_flags():
            return name
    return None


CPUINFO = "/proc/cpuinfo"  # Linux's: a line "flags : fpu vme ..." for each CPU


def cpu_flags() -> set[str]:
    """The feature flags Linux lists for the first CPU; an empty set where there is no such file (not Linux)."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return set()
