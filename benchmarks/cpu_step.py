"""One ResNet-18 training step on the CPU, by memory layout and precision: what channels-last and bf16 autocast
each give on this machine (docs/results.md, "bf16 autocast on the CPU").

    python benchmarks/cpu_step.py
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/cpu_step.py     # as on a CPU without AVX-512, AMX or AVX512-BF16

A batch of 64 random images at 64 px, a 128-wide head, the fused AdamW mltk uses; 3 steps to warm up, then the
images/s of 15. The model's own arithmetic only: no data loading, no loss beyond a mean square.
"""

import time

import timm
import torch


def images_per_second(amp: bool, layout: torch.memory_format, steps: int = 15) -> float:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=128).to(memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    images = torch.randn(64, 3, 64, 64).to(memory_format=layout)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(images)
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(images) / (time.perf_counter() - started)


if __name__ == "__main__":
    for amp in (False, True):
        for name, layout in (("contiguous", torch.contiguous_format), ("channels-last", torch.channels_last)):
            print(f"{'bf16' if amp else 'fp32'}  {name:13s} {images_per_second(amp, layout):7.1f} images/s", flush=True)
