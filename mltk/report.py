"""Plots and the self-contained HTML pages of ``mltk evaluate`` and ``mltk compare`` (images inlined as base64 PNGs).

Class names, paths and every other string from a file are data, never markup: control characters
are shown as escapes (``mltk.display.shown``), HTML is escaped, and matplotlib does not parse them as mathtext
(a class called ``$x$`` is drawn as the four characters it is, and ``$\\foo{$`` does not crash).
"""

import base64
import html
import io
from typing import Sequence

import numpy as np

from mltk.display import setting, shown


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


def training_curves(histories: dict[str, list[dict]]) -> bytes:
    """Training loss and validation recall@1 against epoch: one line per run (``name -> metrics.jsonl records``), overlaid."""
    plt = _figure()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = (("loss", "training loss", "no epoch finished"), ("val_recall@1", "validation recall@1", "no validation data"))
    colours = plt.get_cmap("tab10")
    for i, (name, records) in enumerate(histories.items()):
        style = dict(color=colours(i % 10), linestyle=("-", "--", ":", "-.")[i // 10 % 4], label=shown(name))
        for ax, (key, _, _) in zip(axes, panels):
            points = [(r["epoch"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) <= 30 else None, markersize=3, **style)
    for ax, (_, label, empty) in zip(axes, panels):
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not ax.lines:
            ax.text(0.5, 0.5, empty, ha="center", va="center", color="grey", transform=ax.transAxes)
    losses = [y for line in axes[0].lines for y in line.get_ydata()]
    if losses and min(losses) > 0 and max(losses) > 30 * min(losses):  # losses of different kinds, tens apart: each stays readable
        axes[0].set_yscale("log")
    recalls = [y for line in axes[1].lines for y in line.get_ydata()]
    if recalls:  # a share: never drawn past 0 or 1
        margin = 0.1 * (max(recalls) - min(recalls) or 1)
        axes[1].set_ylim(max(0.0, min(recalls) - margin), min(1.0, max(recalls) + margin) + 0.01)
    if len(histories) > 1:
        handles, labels = axes[0].get_legend_handles_labels()
        if not handles:
            handles, labels = axes[1].get_legend_handles_labels()
        legend = fig.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(labels)), frameon=False)
        for text in legend.get_texts():  # run names are text, not mathtext
            text.set_parse_math(False)
    fig.tight_layout()
    return _png(fig)


def _text(value: object) -> str:
    """A user's or a file's string as HTML text: control characters shown as escapes, markup escaped."""
    return html.escape(shown(value))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_text(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _figures(figures: dict[str, bytes]) -> str:
    return "".join(f"<section><h2>{_text(name)}</h2>{_img(png, name)}</section>" for name, png in figures.items())


def _pairs(values: dict, kind: str = "pairs") -> str:
    """A two-column table: each name and its value (a float to 4 places); ``kind`` its class (``settings``: left-aligned text)."""
    rows = "".join(f"<tr><td>{_text(k)}</td><td>{v:.4f}</td></tr>" if isinstance(v, float) else f"<tr><td>{_text(k)}</td><td>{_text(v)}</td></tr>" for k, v in values.items())
    return f'<table class="{kind}">{rows}</table>'


def _page(title: str, body: str, generator: str = "mltk", width: int | None = 1100) -> str:
    """One self-contained HTML page in mltk's reports' style, at most ``width`` pixels wide (None: the window's width);
    ``generator`` names what wrote it (in a meta tag)."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{html.escape(generator)}"><title>{_text(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: {f"{width}px" if width else "none"}; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 3px 14px 3px 0; }}
th {{ text-align: left; border-bottom: 2px solid #999; white-space: nowrap; }}
.wide {{ overflow-x: auto; }}
.runs td:first-child, .runs th:first-child {{ position: sticky; left: 0; background: #fff; }}
.pairs td:nth-child(2), td.number {{ font-variant-numeric: tabular-nums; text-align: right; white-space: nowrap; }}
th.number {{ text-align: right; }}
td.best {{ font-weight: bold; color: #1a7f37; }}
.notes {{ color: #555; }}
code {{ background: #f3f3f3; padding: 0 3px; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{_text(title)}</h1>
{body}
</body></html>
"""


def html_report(
    title: str, metrics: dict[str, float], info: dict[str, str], figures: dict[str, bytes], config: dict | None = None,
    operating_points: dict[str, str] | None = None,
) -> str:
    """One self-contained HTML page: the metrics table, the score thresholds (``operating_points``: name -> what it
    gives), facts about the evaluation, the run's ``config`` (when the model comes from a run directory), the figures."""
    configuration = f"<h2>Configuration</h2>{_pairs({k: setting(v) for k, v in config.items()}, 'settings')}" if config else ""
    points = f"<h2>Operating points (thresholds.json)</h2>{_pairs(operating_points, 'settings')}\n" if operating_points else ""
    return _page(title, f"<h2>Metrics</h2>{_pairs(metrics)}\n{points}<h2>Evaluation</h2>{_pairs(info)}\n{configuration}\n{_figures(figures)}")


def table_page(title: str, header: list[str], rows: list[list[str]], numeric: list[bool], best: set[tuple[int, int]], notes: list[tuple[str, str]], figures: dict[str, bytes], generator: str = "mltk") -> str:
    """One self-contained HTML page: a table (the cells at ``best`` (row, column) marked), notes under it, the figures.

    Each note is (text, command): the command, if any, is shown as code after the text.
    """
    def cell(tag: str, r: int, c: int, value: str) -> str:
        classes = " ".join(name for name, on in (("number", numeric[c]), ("best", (r, c) in best)) if on)
        attribute = f' class="{classes}"' if classes else ""
        return f"<{tag}{attribute}>{_text(value)}</{tag}>"

    head = "".join(cell("th", -1, c, name) for c, name in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", r, c, value) for c, value in enumerate(row)) + "</tr>" for r, row in enumerate(rows))
    items = "".join(f"<li>{_text(text)}{f'<code>{_text(command)}</code>' if command else ''}</li>" for text, command in notes)
    return _page(title, f'<div class="wide"><table class="runs"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>\n<ul class="notes">{items}</ul>\n{_figures(figures)}', generator, width=None)  # the table as wide as the window: its metrics come last
