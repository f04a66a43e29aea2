"""Losses pytorch-metric-learning does not have, written as PML loss functions."""

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import common_functions as c_f


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
