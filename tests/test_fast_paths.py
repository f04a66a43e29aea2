"""The training's fast paths change speed, not results: images decoded once in memory, channels-last convolutions,
the fused AdamW."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, make_image_folder

from mltk.data import ImageDataset, LabelledImages, decoded_estimate, load_data, make_transform


def images(dataset, order):
    return torch.stack([dataset[i][0] for i in order]), [dataset[i][2] for i in order]


def test_decoded_images_give_the_tensors_reading_the_files_gives(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=4, per_class=3, size=20)
    data = load_data(str(folder))
    bad = folder / "class_01" / "1.png"
    bad.write_bytes(b"not a png")  # passed the scan earlier, fails now: a classmate stands in, in memory as from disk
    transform = make_transform({"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 1.0}, augment=False)
    streamed = ImageDataset(data, transform, "RGB", stand_in=True)
    kept = ImageDataset(data, transform, "RGB", stand_in=True)
    assert kept.keep_decoded(1 << 20) == kept.decoded_bytes == 11 * 20 * 20 * 3  # eleven decode, one fails
    order = list(range(len(data)))
    (a, failed_a), (b, failed_b) = images(streamed, order), images(kept, order)
    assert torch.equal(a, b) and failed_a == failed_b and failed_a[[Path(x).resolve() for x in data.sources].index(bad.resolve())] >= 0


def test_images_that_would_not_fit_are_read_from_disk(tmp_path):
    data = load_data(str(make_image_folder(tmp_path / "images", classes=3, per_class=4, size=24)))
    assert decoded_estimate(data, "RGB") == 12 * 24 * 24 * 3 and decoded_estimate(data, "L") == 12 * 24 * 24
    dataset = ImageDataset(data, lambda image: image, "RGB")
    assert dataset.keep_decoded(12 * 24 * 24 * 3 - 1) == 0 and dataset.decoded is None  # one byte short: streams
    assert dataset.keep_decoded(12 * 24 * 24 * 3) > 0 and len(dataset.decoded) == 12
    empty = ImageDataset(LabelledImages([], [], ["a"]), lambda image: image)
    assert empty.keep_decoded(1 << 20) == 0


def test_a_run_keeps_its_images_in_memory_uses_channels_last_and_the_fused_adamw(tmp_path, monkeypatch, mltk_main):
    from mltk import train as train_mod
    from mltk.config import make_config

    seen = {}
    real = train_mod.build_optimizer

    def spy(cfg, model, *args):
        seen["conv"] = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).weight.is_contiguous(memory_format=torch.channels_last)
        optimizer, scheduler = real(cfg, model, *args)
        seen["fused"] = optimizer.defaults["fused"]
        return optimizer, scheduler

    monkeypatch.setattr(train_mod, "build_optimizer", spy)
    folder = make_image_folder(tmp_path / "images", classes=6, per_class=4)
    code, out, err = mltk_main("run", "--data", folder, "--backbone", "resnet18", "--image-size", "32", "--dim", "16", "--batch-size", "8",
                               "--m-per-class", "2", "--epochs", "1", "--workers", "2", "--out", tmp_path / "run")
    assert code == 0, err
    assert seen == {"conv": True, "fused": True}
    assert "decoded once, kept in memory" in out
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(record["loss"])
    assert train_mod.channels_last(train_mod.build_embedder(make_config({**TINY, "backbone": "resnet18"}))) is True
    assert train_mod.channels_last(train_mod.build_embedder(make_config({**TINY, "backbone": "vit_tiny_patch16_224", "image_size": 32}))) is False


def test_channels_last_gives_the_gradients_and_fused_adamw_the_steps_of_the_plain_ones():
    import timm

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = timm.create_model("resnet18", num_classes=8).to(memory_format=layout)
        model(x.contiguous(memory_format=layout)).logsumexp(1).mean().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    scale = grads[0].abs().max()
    assert (grads[0] - grads[1]).abs().max() <= 1e-4 * scale  # float rounding apart, the same gradients
    steps = []
    for fused in (False, True):
        weights = [torch.nn.Parameter(g.clone()) for g in torch.randn(3, 50, generator=torch.Generator().manual_seed(2))]
        optimizer = torch.optim.AdamW(weights, lr=1e-3, weight_decay=0.05, fused=fused)
        for step in range(3):
            for w in weights:
                w.grad = torch.randn(50, generator=torch.Generator().manual_seed(10 + step))
            optimizer.step()
        steps.append(torch.cat([w.detach() for w in weights]))
    assert torch.allclose(steps[0], steps[1], atol=1e-6)


def test_a_run_whose_images_are_in_memory_goes_on_when_the_files_go_away(tmp_path):
    import shutil

    from mltk.config import make_config
    from mltk.train import train

    folder = make_image_folder(tmp_path / "images")
    result = train(make_config({**TINY, "data": str(folder), "epochs": 3}), tmp_path / "run", on_epoch=lambda record: shutil.rmtree(folder, ignore_errors=True))
    assert [r["epoch"] for r in result.history] == [1, 2, 3] and result.in_memory > 0 and not folder.exists()
