"""Plots and the self-contained HTML report of ``mltk evaluate`` (images inlined as base64 PNGs).

Class names, paths and every other string from a file are data, never markup: control characters
are shown as escapes (``mltk.display.shown``), HTML is escaped, and matplotlib does not parse them as mathtext
(a class called ``$x$`` is drawn as the four characters it is, and ``$\\foo{$`` does not crash).
"""

import base64
import html
import io
from typing import Sequence

import numpy as np

from mltk.display import shown


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    return buffer.getvalue()


def roc_plot(fpr: np.ndarray, tpr: np.ndarray, auc: float) -> bytes:
    """The ROC curve, with a log-scaled FAR axis beside the linear one (low FARs matter for verification)."""
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, log in zip(axes, (False, True)):
        ax.plot(fpr, tpr, lw=1.5, label=f"ROC-AUC {auc:.4f}")
        ax.set_xlabel("false accept rate (FAR)")
        ax.set_ylabel("true accept rate (TAR)")
        ax.grid(alpha=0.3)
        if log:
            ax.set_xscale("log")
            lowest = fpr[fpr > 0].min() if (fpr > 0).any() else 1e-5
            ax.set_xlim(max(1e-5, min(lowest, 0.1)), 1)  # a span even when every positive FAR is 1
        else:
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            ax.legend(loc="lower right")
    fig.suptitle("ROC curve")
    return _png(fig)


def sample_classes(labels: np.ndarray, max_classes: int, seed: int = 0) -> np.ndarray:
    """Indices of the items of at most ``max_classes`` classes (a random sample when there are more)."""
    classes = np.unique(labels)
    if len(classes) > max_classes:
        classes = np.random.default_rng(seed).choice(classes, max_classes, replace=False)
    return np.flatnonzero(np.isin(labels, classes))


def project(embeddings: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """2-D coordinates by t-SNE (scikit-learn) or UMAP (umap-learn), cosine metric."""
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(embeddings) - 1) // 3)))
        return TSNE(n_components=2, metric="cosine", init="pca", perplexity=perplexity, random_state=seed).fit_transform(embeddings)
    if method == "umap":
        import warnings

        import umap

        neighbours = int(min(15, max(2, len(embeddings) - 1)))
        with warnings.catch_warnings():  # its note that a seed means one thread, on every run
            warnings.filterwarnings("ignore", message=r"n_jobs value .* overridden")
            return umap.UMAP(n_components=2, metric="cosine", n_neighbors=neighbours, random_state=seed).fit_transform(embeddings)
    raise ValueError(f"unknown projection {method!r}")


def scatter_plot(points: np.ndarray, labels: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 6))
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab20" if len(classes) <= 20 else "hsv", len(classes))
    for i, c in enumerate(classes):
        mine = labels == c
        ax.scatter(points[mine, 0], points[mine, 1], s=10, color=cmap(i), label=shown(class_names[c]) if c < len(class_names) else str(c))
    if len(classes) <= 20:
        legend = ax.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
        for text in legend.get_texts():  # class names are text, not mathtext
            text.set_parse_math(False)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return _png(fig)


def retrieval_grid(queries: list, neighbours: list[list], correct: np.ndarray, open_image) -> bytes:
    """Each row: a query, then its top-k; green frame = same class, red = another class."""
    plt = _figure()
    rows, k = len(queries), len(neighbours[0]) if neighbours else 0
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.3 * (k + 1), 1.3 * rows), squeeze=False)
    for r in range(rows):
        for c in range(k + 1):
            ax = axes[r][c]
            source = queries[r] if c == 0 else neighbours[r][c - 1]
            ax.imshow(np.asarray(open_image(source, "RGB")))
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "black" if c == 0 else ("#1a9850" if correct[r][c - 1] else "#d73027")
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3 if c else 1)
        axes[r][0].set_ylabel("query", fontsize=7)
    fig.suptitle("retrieval: query, then its nearest neighbours (green: same class, red: other)", fontsize=9)
    return _png(fig)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(shown(alt))}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def html_report(title: str, metrics: dict[str, float], info: dict[str, str], figures: dict[str, bytes]) -> str:
    """One self-contained HTML page: the metrics table, facts about the evaluation, the figures."""
    text = lambda value: html.escape(shown(value))  # noqa: E731
    rows = "".join(f"<tr><td>{text(k)}</td><td>{v:.4f}</td></tr>" if isinstance(v, float) else f"<tr><td>{text(k)}</td><td>{text(v)}</td></tr>" for k, v in metrics.items())
    facts = "".join(f"<tr><td>{text(k)}</td><td>{text(v)}</td></tr>" for k, v in info.items())
    sections = "".join(f"<section><h2>{text(name)}</h2>{_img(png, name)}</section>" for name, png in figures.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{text(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td {{ border-bottom: 1px solid #ddd; padding: 3px 14px 3px 0; }}
td:nth-child(2) {{ font-variant-numeric: tabular-nums; text-align: right; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{text(title)}</h1>
<h2>Metrics</h2><table>{rows}</table>
<h2>Evaluation</h2><table>{facts}</table>
{sections}
</body></html>
"""
