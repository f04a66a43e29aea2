"""The baseline a user would otherwise write by hand: timm + pytorch-metric-learning, ArcFace only.

Used by the benchmarks beside ``mltk run`` on the same model, data, image size and epochs.
"""

import fnmatch
import time

import numpy as np
import timm
import torch
import torchvision
from pytorch_metric_learning import losses, samplers
from pytorch_metric_learning.utils import common_functions as c_f
from timm.data import create_transform, resolve_data_config


def class_filter(patterns):
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def image_folder(root, patterns, transform):
    """torchvision's ImageFolder restricted to the classes matching ``patterns``, relabelled 0..n-1."""
    full = torchvision.datasets.ImageFolder(root, transform=transform)
    keep_classes = [c for c in full.classes if class_filter(patterns)(c)]
    new_id = {full.class_to_idx[c]: i for i, c in enumerate(keep_classes)}
    full.samples = [(p, new_id[y]) for p, y in full.samples if y in new_id]
    full.targets = [y for _, y in full.samples]
    full.classes = keep_classes
    return full


def train_plain(root, patterns, backbone="resnet18", image_size=64, dim=512, epochs=15, batch_size=64, m=4, lr=1e-3, loss_lr=1e-2, workers=2, seed=0, augment=False, augment_options=None, model=None, log=print, in_memory=False, amp=False):
    """Train for ``epochs``; returns (model, transform, images_per_s, seconds).

    ``model``: a timm model to start from (pretrained, say); its classifier becomes the ``dim``-wide embedding layer.
    ``in_memory`` (no augmentation): every image is decoded and transformed once into one tensor, and the epochs
    train from a TensorDataset without DataLoader workers, the fastest a hand-written loop gets on data that fits in
    memory; the decoding is not timed.
    ``amp``: the forward under ``torch.autocast`` (bf16 on the CPU, as ``mltk run --amp`` has it), the loss in float32.
    """
    torch.manual_seed(seed)
    c_f.NUMPY_RANDOM = np.random.RandomState(seed)  # MPerClassSampler draws from it
    if model is None:
        model = timm.create_model(backbone, pretrained=False, num_classes=dim)
    else:
        model.reset_classifier(dim)
    data_cfg = {**resolve_data_config({}, model=model), "input_size": (3, image_size, image_size)}
    train_tf = create_transform(**data_cfg, is_training=augment, **((augment_options or {}) if augment else {}))
    eval_tf = create_transform(**data_cfg, is_training=False)
    dataset = image_folder(root, patterns, train_tf)
    loss_fn = losses.ArcFaceLoss(num_classes=len(dataset.classes), embedding_size=dim)
    sampler = samplers.MPerClassSampler(dataset.targets, m=m, batch_size=batch_size, length_before_new_iter=len(dataset))
    if in_memory:
        assert not augment, "in_memory decodes each image once: no augmentation"
        decoded = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers)
        tensors = [torch.cat(part) for part in zip(*decoded)]
        dataset, workers = torch.utils.data.TensorDataset(*tensors), 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True)
    optimizer = torch.optim.Adam([{"params": model.parameters(), "lr": lr}, {"params": loss_fn.parameters(), "lr": loss_lr}])
    images, started = 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                embeddings = model(x)
            loss = loss_fn(embeddings.float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            images += len(y)
        log(f"plain loop epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}")
    seconds = time.perf_counter() - started
    return model.eval(), eval_tf, images / seconds, seconds


@torch.no_grad()
def embed_plain(model, transform, root, patterns, batch_size=256, workers=2):
    """L2-normalised embeddings and labels of the matching classes, as numpy arrays."""
    dataset = image_folder(root, patterns, transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    out, labels = [], []
    for x, y in loader:
        out.append(torch.nn.functional.normalize(model(x), dim=1))
        labels.append(y)
    return torch.cat(out).numpy(), torch.cat(labels).numpy()
