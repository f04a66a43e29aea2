"""Losses pytorch-metric-learning does not have, written as PML loss functions, and the weighted sum
a ``--loss`` spec ("0.01*center+ce+arcface") names, as PML's MultipleLosses sits beside its losses."""

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import common_functions as c_f
from torch import nn

from mltk import registry
from mltk.config import RunConfig, parse_loss_spec
from mltk.errors import UsageError


class CenterLoss(BaseMetricLossFunction):
    """Center loss (Wen et al., 2016): half the squared distance of each embedding to its class center.

    The centers are parameters (``num_classes x embedding_size``) learned by the optimiser.
    With the default distance, embeddings and centers are L2-normalised first, so the loss lives
    on the same sphere as ArcFace and stays in [0, 2]; pass
    ``distance=LpDistance(normalize_embeddings=False, power=2)`` for the paper's raw features.
    A similarity (e.g. CosineSimilarity) gives ``1 - similarity`` per sample instead.
    """

    def __init__(self, num_classes: int, embedding_size: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.centers = torch.nn.Parameter(torch.randn(num_classes, embedding_size))
        self.add_to_recordable_attributes(list_of_names=["num_classes"], is_stat=False)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_required(labels)
        centers = self.centers.to(embeddings.dtype)[labels]
        d = self.distance.pairwise_distance(self.distance.maybe_normalize(embeddings), self.distance.maybe_normalize(centers))
        if self.distance.power != 1:
            d = d**self.distance.power
        losses = 1 - d if self.distance.is_inverted else 0.5 * d
        return {"loss": {"losses": losses, "indices": c_f.torch_arange_from_size(embeddings), "reduction_type": "element"}}

    def get_default_distance(self):
        return LpDistance(normalize_embeddings=True, p=2, power=2)


class CrossEntropyLoss(BaseMetricLossFunction):
    """Softmax cross-entropy through a linear classifier on the embedding (``classifier`` owns W, b)."""

    def __init__(self, num_classes: int, embedding_size: int, label_smoothing: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.classifier = torch.nn.Linear(embedding_size, num_classes)
        self.label_smoothing = label_smoothing
        self.add_to_recordable_attributes(list_of_names=["num_classes", "label_smoothing"], is_stat=False)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_required(labels)
        logits = self.classifier(embeddings.to(self.classifier.weight.dtype))
        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none", label_smoothing=self.label_smoothing)
        return {"loss": {"losses": losses, "indices": c_f.torch_arange_from_size(embeddings), "reduction_type": "element"}}


class WeightedLosses(nn.Module):
    """A weighted sum of registered losses; each may own parameters (ArcFace W, centers, a classifier).

    Across processes (``distribute``) every loss sees the embeddings of all processes, through
    pytorch-metric-learning's DistributedLossWrapper (the miner's indices cover them too), so the
    gradients equal those of one process on the whole batch.
    """

    def __init__(self, terms: list[tuple[float, str, nn.Module]]):
        super().__init__()
        self.weights = {name: weight for weight, name, _ in terms}
        self.losses = nn.ModuleDict({name: loss for _, name, loss in terms})
        self.gathered: dict[str, nn.Module] = {}  # a plain dict: the state dict keeps its keys
        self.scale = 1

    def distribute(self) -> None:
        """Gather the embeddings of every process into each loss (after torch.distributed is started)."""
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

        self.scale = torch.distributed.get_world_size()
        self.gathered = {name: DistributedLossWrapper(loss) for name, loss in self.losses.items()}
        # The wrapper scales its loss by the number of processes, so that DDP's mean of the model's gradients
        # (each process's embeddings' share) is the whole batch's gradient. The losses' own parameters get
        # that whole gradient in every process: unscale it, and DDP's mean leaves it as it is.
        for parameter in self.losses.parameters():
            parameter.register_hook(lambda grad: grad / self.scale)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple=None):
        parts = {name: self.gathered.get(name, loss)(embeddings, labels, indices_tuple) for name, loss in self.losses.items()}
        total = self.weighted(parts)
        return total, {name: value.detach() / self.scale for name, value in parts.items()}

    def weighted(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * value for name, value in parts.items())


#: Registered losses that `mltk run` cannot train, and why: it refuses them before any work, and
#: `mltk list losses` says so in their description.
CANNOT_TRAIN = {
    "DynamicSoftMarginLoss": "it keeps its histogram's graph from one step to the next, so the second step fails",
    "HistogramLoss": "it indexes past its last bin when a cosine similarity reaches 1 (two embeddings that point the same way)",
    "ManifoldLoss": "it takes no labels",
    "VICRegLoss": "it takes no labels (it compares two views of each image)",
}


def check_loss_names(spec: str) -> None:
    """Every loss the spec names is registered (an unknown one: a UsageError naming close matches) and can train."""
    for _, name in parse_loss_spec(spec):
        registry.get("losses", name)
        if name in CANNOT_TRAIN:
            raise UsageError(f"loss {name!r} cannot train under mltk run: {CANNOT_TRAIN[name]}; see `mltk list losses` for the others")


def build_losses(cfg: RunConfig, num_classes: int, dim: int) -> WeightedLosses:
    """The losses of ``cfg.loss`` with their ``cfg.loss_options``, for ``num_classes`` classes and ``dim``-wide embeddings."""
    terms = []
    for weight, name in parse_loss_spec(cfg.loss):
        options = dict(cfg.loss_options.get(name, {}))
        terms.append((weight, name, registry.create_loss(name, num_classes=num_classes, embedding_size=dim, **options)))
    return WeightedLosses(terms)
