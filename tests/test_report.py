"""report.html and compare.html in a real browser (Debian's Chromium, driven by Playwright): they load with no error and
fetch nothing, their tables sort on a click, they fit the window, and strings from files stay text."""

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, make_image_folder

CHROMIUM = os.environ.get("MLTK_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
ODD = ["<img src=x onerror=alert(1)>", "$\\frac{1}{0}$"]  # class names: markup to HTML and to matplotlib's mathtext


@pytest.fixture(scope="module")
def browser():
    """Chromium, headless. Not skipped when missing: CI installs it (.ci/run), and so can anyone (see README)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (Debian, Ubuntu), or set MLTK_TEST_CHROMIUM to a Chromium binary")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


class Opened:
    """A page opened from a file, with what it logged and every request it made."""

    def __init__(self, browser, path: Path, width: int, height: int):
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.errors, self.requests = [], []
        self.page.on("console", lambda message: message.type in ("error", "warning") and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.url = path.resolve().as_uri()
        self.page.goto(self.url)

    def fetched(self) -> list[str]:
        """Requests beyond the page itself and its inline images."""
        return [url for url in self.requests if url != self.url and not url.startswith("data:")]

    def overflow(self) -> int:
        """How many pixels the page is wider than the window (0: it fits, nothing to scroll sideways)."""
        return self.page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")

    def column(self, table: str, index: int) -> list[str]:
        return self.page.eval_on_selector_all(f"{table} tbody tr", f"rows => rows.map(row => row.cells[{index}].textContent)")


@pytest.fixture
def opened(browser):
    pages = []

    def open_(path: Path, width: int = 1280, height: int = 800) -> Opened:
        pages.append(Opened(browser, path, width, height))
        return pages[-1]

    yield open_
    for page in pages:
        page.page.close()


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> Path:
    """report.html of a tiny trained run, evaluated on all its classes (two named like markup): written as mltk evaluate
    writes it."""
    from mltk import evaluate as ev
    from mltk.config import make_config
    from mltk.data import load_data
    from mltk.model import load
    from mltk.train import train

    root = tmp_path_factory.mktemp("report")
    folder = make_image_folder(root / "images", classes=8, per_class=4)
    for i, name in enumerate(ODD):
        (folder / f"class_0{i}").rename(folder / name)
    train(make_config({**TINY, "data": str(folder), "val_classes": 0.5}), root / "run")
    model = load(root / "run" / "last.pt", "cpu")
    result = ev.evaluate(model, data=load_data(str(folder)), workers=0)
    page = ev.build_report(result, f"mltk evaluate — {root / 'run'}", training=ev.training_of(root / "run"), projections=())  # t-SNE and UMAP: slow, and only images
    (root / "report.html").write_text(page, encoding="utf-8")
    return root / "report.html"


def test_the_report_loads_shows_its_parts_in_order_and_fetches_nothing(report_page, opened):
    page = opened(report_page)
    headings = page.page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
    assert headings[:3] == ["Evaluated", "Verification: are two images of one class?", "Retrieval: what a query finds among the gallery"]
    assert headings.index("Scores of same-class and different-class pairs") < headings.index("ROC curve") < headings.index("Worst queries")
    assert headings.index("Worst queries") < headings.index("Classes, worst first") < headings.index("Training curves")
    assert headings[-1] == "Configuration" and page.page.eval_on_selector_all("details", "ds => ds.map(d => d.open)") == [False, False]
    lead = page.page.inner_text(".lead")  # first: the data and the checkpoint, and what to beware of
    assert lead.startswith("Data: ") and "8 classes, 32 images" in lead and "Scored: checkpoint " in lead and "last.pt, epoch 1" in lead
    assert "of the 8 evaluated classes are classes the run trained on" in page.page.inner_text(".caution")
    labels = page.column("table.metrics", 0)
    assert {"ROC-AUC", "TAR @ FAR 1e-3", "EER", "recall@1", "MAP@R"} <= set(labels) and "roc_auc" not in labels
    assert page.errors == [] and page.fetched() == []


def test_class_names_are_text_in_the_page(report_page, opened):
    page = opened(report_page)
    classes = page.column(".box table", 0)
    assert set(ODD) <= set(classes)  # shown as they are, as text
    assert page.page.query_selector("img[src=x]") is None and page.errors == [] and page.fetched() == []


def test_the_report_tables_sort_on_a_click(report_page, opened):
    page = opened(report_page)
    recall = [float(v) for v in page.column(".box table", 2)]
    assert recall == sorted(recall)  # worst first
    page.page.click(".box th:nth-child(1)")  # class: by name, A to Z
    names = page.column(".box table", 0)
    plain = [name for name in names if name.startswith("class_")]
    assert plain == sorted(plain) and len(plain) == 6
    page.page.click(".box th:nth-child(1)")
    assert page.column(".box table", 0) == names[::-1]
    page.page.click(".box th:nth-child(3)")  # a number: highest first
    assert [float(v) for v in page.column(".box table", 2)] == sorted(recall, reverse=True)
    ranks = page.column("table.queries", 2)
    page.page.focus("table.queries th:nth-child(3)")
    page.page.keyboard.press("Enter")  # the keyboard sorts too
    assert page.column("table.queries", 2) == sorted(ranks, key=lambda r: int(r) if r.isdigit() else 10**9, reverse=True)
    assert page.errors == []


@pytest.mark.parametrize("width, height", [(1920, 1080), (1280, 800)])
def test_the_report_fits_the_window(report_page, opened, width, height, tmp_path):
    page = opened(report_page, width, height)
    assert page.overflow() == 0
    shot = tmp_path / "report.png"
    page.page.screenshot(path=shot, full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def wide_table():
    """A compare table as wide as a real one (docs/results.md's Omniglot table): 7 runs, 20 columns, long settings."""
    from mltk.compare import TRAINING, Column, Table, marked

    settings = {
        "augment": [False, False, True, True, True, True, True],
        "augment_options": [{}] + [{"color_jitter": 0, "hflip": 0, "ratio": [0.8, 1.25], "scale": [0.6, 1.0]}] * 6,
        "backbone": ["resnet18"] * 5 + ["hybrid", "resnet18"],
        "backbone_kwargs": [{}] * 5 + [{"cnn": "resnet18", "swin_kwargs": {"depths": [2, 2], "embed_dim": 48}}, {}],
        "freeze_backbone": [True] + [False] * 6,
        "dim": [None, 512, 512, 4096, 4096, 8192, 512],
        "loss": ["arcface", "0.1*center+ce", *["0.1*center+ce+arcface"] * 5],
        "epochs": [0, 10, 10, 10, 10, 10, 15],
        "m_per_class": [4] * 6 + [2],
        "lr": [0.001] * 6 + [0.002],
        "warmup_epochs": [1] * 6 + [2],
    }
    training = [[None, None, None], [376, 71.4, 10], [372, 72.2, 10], [387, 69.4, 10], [708, 37.9, 10], [504, 53.3, 10], [595, 67.7, 15]]
    metrics = [None, [0.8512, 0.0516, 0.4179, 0.6660, 0.1127], [0.9078, 0.0913, 0.6014, 0.8222, 0.2120], [0.8275, 0.0545, 0.4123, 0.6401, 0.1029],
               [0.8579, 0.0727, 0.4873, 0.7311, 0.1424], [0.8634, 0.0586, 0.4358, 0.7009, 0.1296], [0.9591, 0.1667, 0.8104, 0.9340, 0.4375]]
    names = ["cpu0_frozen", "cpu1_center_ce", "cpu2_arcface_augment", "cpu3_4096", "cpu4_deeper_4096", "cpu5_hybrid_8192", "runs/omniglot/omniglot_best"]
    headers = ["ROC-AUC", "TAR@FAR=1e-3", "recall@1", "recall@4", "MAP@R"]
    columns = [Column("run"), *(Column(key, format="setting") for key in settings), *(c for c, _ in TRAINING), *(Column(h, "higher", "metric") for h in headers)]
    rows = [[name, *(values[r] for values in settings.values()), *training[r], *(metrics[r] or [None] * 5)] for r, name in enumerate(names)]
    return Table(columns=columns, rows=rows, best=marked(columns, rows), notes=[("cpu0_frozen: not trained", "")], runs=[])


@pytest.fixture(scope="module")
def compare_page(tmp_path_factory) -> Path:
    from mltk import compare

    path = tmp_path_factory.mktemp("compare") / "compare.html"
    path.write_text(compare.html(wide_table()), encoding="utf-8")
    return path


def test_compare_fits_1920_pixels_and_scrolls_its_table_in_its_own_box_when_narrower(compare_page, opened):
    wide = opened(compare_page, 1920, 1080)
    assert wide.overflow() == 0 and wide.errors == [] and wide.fetched() == []
    box = "el => [el.scrollWidth, el.clientWidth]"
    table, shown = wide.page.eval_on_selector(".wide", box)
    assert table <= shown  # every column in view: the metrics no longer fall off the right
    narrow = opened(compare_page, 1280, 800)
    assert narrow.overflow() == 0  # the page never scrolls sideways: the table's box does
    narrow.page.eval_on_selector(".wide", "el => el.scrollLeft = el.scrollWidth")
    run = narrow.page.eval_on_selector(".runs tbody td:first-child", "td => td.getBoundingClientRect().left")
    box_left = narrow.page.eval_on_selector(".wide", "el => el.getBoundingClientRect().left")
    assert abs(run - box_left) < 1  # scrolled to the right, the run column stays in view


def test_compare_columns_sort_by_value_on_a_click(compare_page, opened):
    page = opened(compare_page)
    header = page.page.eval_on_selector_all(".runs th", "ths => ths.map(th => th.textContent)")
    auc, seconds = header.index("ROC-AUC"), header.index("train time")
    page.page.click(f".runs th:nth-child({auc + 1})")
    values = page.column(".runs", auc)
    assert values == ["0.9591", "0.9078", "0.8634", "0.8579", "0.8512", "0.8275", "–"]  # highest first, missing last
    assert page.column(".runs", 0)[0] == "runs/omniglot/omniglot_best"  # whole rows move
    page.page.click(f".runs th:nth-child({seconds + 1})")  # by seconds, not by text ("11 min" after "6 min")
    page.page.click(f".runs th:nth-child({seconds + 1})")  # the second click: lowest first
    assert page.column(".runs", seconds) == ["6 min 12 s", "6 min 16 s", "6 min 27 s", "8 min 24 s", "9 min 55 s", "11 min 48 s", "–"]
    assert page.errors == []


def test_a_page_whose_strings_are_markup_shows_them_as_text_and_sorts_them_as_people_count(opened, tmp_path):
    from mltk.report import table_page

    path = tmp_path / "t.html"
    rows = [["run_10", "2"], ["<script>alert(1)</script>", "10"], ["run_2", "–"]]
    path.write_text(table_page("<b>t</b>", ["run", "<i>x</i>"], rows, [False, True], set(), [("<img src=x>", "")], {}))
    page = opened(path)
    assert page.column(".runs", 0)[1] == "<script>alert(1)</script>" and page.page.title() == "<b>t</b>"
    assert page.page.query_selector("i, b, img") is None and page.errors == [] and page.fetched() == []
    page.page.click(".runs th:nth-child(1)")
    assert page.column(".runs", 0)[1:] == ["run_2", "run_10"]  # numbers within names in their order
    page.page.click(".runs th:nth-child(2)")  # a number column without sort keys: the numbers its cells show
    assert page.column(".runs", 1) == ["10", "2", "–"]


# --- What the pages are made of: no browser needed ----------------------------------------------------------------


def test_the_metrics_are_grouped_labelled_and_explained():
    from mltk.report import metric_groups

    values = {"recall@1": 0.5, "roc_auc": 0.91234, "tar@far=0.001": None, "map@r": 0.25, "pairs": 12345, "pairs_sampled": 0, "my_metric": 0.1}
    groups = metric_groups(values)
    assert list(groups) == ["verification", "retrieval", "counts", "other"]
    assert [(m.label, m.value) for m in groups["verification"]] == [("ROC-AUC", "0.9123"), ("TAR @ FAR 1e-3", "–")]
    assert [m.label for m in groups["retrieval"]] == ["recall@1", "MAP@R"]  # MAP@R after the recalls, whatever the order given
    assert [(m.label, m.value) for m in groups["counts"]] == [("pairs scored", "12,345"), ("pairs sampled", "no")]
    assert groups["other"][0].label == "my_metric" and groups["other"][0].meaning == ""  # a plugin's metric: shown as it is named
    assert "1e-3 of the different-class pairs" in groups["verification"][1].meaning


def test_the_worst_queries_and_classes_are_those_that_fail_and_agree_with_the_metrics():
    from mltk.metrics import Neighbours, evaluate_embeddings
    from mltk.report import first_hits, per_class, worst_queries

    match = np.array([[True, False, True], [False, False, True], [False, False, False], [False, True, False], [True, True, True]])
    similarities = np.array([[0.9, 0.8, 0.7], [0.9, 0.5, 0.4], [0.6, 0.5, 0.4], [0.95, 0.9, 0.1], [0.9, 0.8, 0.7]], np.float32)
    nb = Neighbours(np.zeros(match.shape, np.int64), similarities, match, np.array([2, 1, 3, 1, 0]))  # the last: nothing to find
    assert first_hits(nb).tolist() == [1, 3, 0, 2, 1]
    assert worst_queries(nb, 10).tolist() == [2, 1, 3, 0]  # none found, then the latest first hit; the last is left out
    both_second = np.array([[False, True, False]] * 2)
    tied = Neighbours(np.zeros((2, 3), np.int64), np.array([[0.6, 0.5, 0.4], [0.9, 0.8, 0.7]], np.float32), both_second, np.ones(2, int))
    assert worst_queries(tied, 2).tolist() == [1, 0]  # both first right at rank 2: the higher-scoring wrong hit (0.9) first

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 5)
    embeddings = rng.normal(size=(30, 8)) + 1.5 * np.eye(8)[labels]
    result = evaluate_embeddings(embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True), labels, metrics=["recall_at_k", "map_at_r"])
    classes, queries, recall, map_r = per_class(result.evaluation.neighbours(), labels)
    assert sorted(classes.tolist()) == list(range(6)) and (queries == 5).all()
    assert list(zip(recall, map_r)) == sorted(zip(recall, map_r))  # worst first
    assert np.average(recall, weights=queries) == pytest.approx(result.values["recall@1"])
    assert np.average(map_r, weights=queries) == pytest.approx(result.values["map@r"])


def test_the_report_names_what_was_evaluated_and_folds_the_configuration():
    from mltk.report import html_report

    provenance = {"data": "birds/test", "classes": 100, "images": 5794, "checkpoint": "runs/<b>x</b>/last.pt", "checkpoint_epoch": 12}
    page = html_report("t", {"roc_auc": 0.5}, {"protocol": "all pairs"}, {}, {"dim": 512}, provenance=provenance, cautions=["best.pt <i>flatters</i>"])
    assert '<p class="lead">Data: birds/test; 100 classes, 5,794 images<br>Scored: checkpoint runs/&lt;b&gt;x&lt;/b&gt;/last.pt, epoch 12</p>' in page
    assert '<p class="caution">best.pt &lt;i&gt;flatters&lt;/i&gt;</p>' in page and "<td>protocol</td>" in page  # info the provenance lacks
    assert page.index("lead") < page.index("<details><summary><h2>Evaluated</h2>") < page.index("ROC-AUC") < page.index("<details><summary><h2>Configuration</h2>")
    bare = html_report("t", {}, {"images": 6}, {})
    assert 'class="lead"' not in bare and "<td>images</td><td>6</td>" in bare  # no provenance: the evaluation's info


# --- strings are data: HTML and matplotlib's mathtext


MARKUP_NAMES = ["$\\frac{1}{0}$", "<script>alert(1)</script>", "$\\foo{$", "[bold]x[/bold]"]


def test_the_html_report_escapes_every_string(tmp_path):
    from mltk.report import html_report

    page = html_report(
        "mltk evaluate — runs/<b>x</b>", {"recall@1": 0.5, "<i>m</i>": "<script>"},
        {"pair list": "a<script>alert(1)</script>&\x1b[31m.csv"}, {"<img src=x onerror=alert(1)>": b"png"},
    )
    assert "<script>" not in page and "<b>x" not in page and "<i>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;\\x1b[31m.csv" in page and "\x1b" not in page
    assert "runs/&lt;b&gt;x&lt;/b&gt;" in page


def test_class_names_are_drawn_as_they_are_not_as_mathtext(monkeypatch):
    from mltk import report

    figures = []
    real_png = report._png
    monkeypatch.setattr(report, "_png", lambda fig: figures.append(fig) or real_png(fig))  # draws it: no parse error
    points, labels = np.random.default_rng(0).normal(size=(8, 2)), np.repeat(np.arange(4), 2)
    png = report.scatter_plot(points, labels, MARKUP_NAMES, "t-SNE")
    assert png.startswith(b"\x89PNG")
    texts = figures[0].axes[0].get_legend().get_texts()
    assert [t.get_text() for t in texts] == MARKUP_NAMES and not any(t.get_parse_math() for t in texts)


def test_umap_s_neighbours_are_exact_cosine_ones_each_point_first_even_beside_a_duplicate():
    from mltk.report import cosine_neighbours

    points = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    points[1] = points[0] * 3  # a duplicate direction: distance 0 to point 0
    order, distances, index = cosine_neighbours(points, 5)
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    brute = 1 - unit @ unit.T
    assert index is None and order.shape == distances.shape == (40, 5)
    assert (order[:, 0] == np.arange(40)).all() and (distances[:, 0] == 0).all()
    for i in range(40):
        others = np.sort(np.delete(brute[i], i))[:4]
        np.testing.assert_allclose(distances[i, 1:], np.maximum(others, 0), atol=1e-5)
    assert order[0, 1] == 1 and order[1, 1] == 0


def test_umap_is_compiled_once_per_machine_not_once_per_report():
    """umap-learn's numba functions are declared without cache=True; the report turns numba's disk cache on for them."""
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    from mltk.report import _umap, project

    umap = _umap()
    compiled = [f for m in (umap.umap_, umap.layouts) for f in vars(m).values() if isinstance(f, Dispatcher)]
    assert umap.umap_.smooth_knn_dist in compiled and len(compiled) > 10
    assert [f.__name__ for f in compiled if isinstance(f._cache, NullCache)] == []
    points = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # umap-learn's notes stay out of the user's terminal
        assert project(points, "umap").shape == (30, 2)
