"""Built-in metrics: recall@k, precision@k and MAP@R from one kNN pass; ROC-AUC, TAR@FAR, EER and
cross-validated accuracy (balanced where one kind of pair outnumbers the other) from pair scores. Each is
``fn(evaluation) -> dict[str, float]``; a value the pairs cannot measure is None (``evaluation.not_measured``)."""

import mltk


@mltk.hookimpl
def register_metrics(register):
    from mltk import metrics

    for needs, functions in (
        ("neighbours", (metrics.recall_at_k, metrics.precision_at_k, metrics.map_at_r)),
        ("pairs", (metrics.roc_auc, metrics.tar_at_far, metrics.eer, metrics.accuracy_10fold)),
    ):
        for function in functions:
            register(function.__name__, function, description=function.__doc__.splitlines()[0], needs=needs)
