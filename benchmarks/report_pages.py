"""The screenshots of docs/figures: mltk evaluate's report.html and mltk compare's page, as a user gets them.

    python benchmarks/report_pages.py                      # about 7 minutes on 2 CPU cores
    python benchmarks/report_pages.py --runs runs/pages    # keep the run directories (and train only those missing)

Trains five short runs on the bundled digits (half the classes held out), each differing from the others in a few
settings, with the ``mltk run`` command; evaluates each run's last.pt on its held-out classes with ``mltk evaluate``;
puts them side by side with ``mltk compare``. Then Debian's Chromium (driven by Playwright, as tests/test_report.py
drives it) opens the pages and takes docs/figures/report.png (the top of the last run's report, 1,280 pixels wide),
docs/figures/report_worst.png (its worst queries and classes) and docs/figures/compare.png (1,920 x 1,080 pixels).
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "docs" / "figures"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
COMMON = ["--data", "digits", "--val-classes", "0.5", "--epochs", "2", "--workers", "0"]
RUNS = {  # name -> what it changes
    "arcface_64": ["--dim", "64"],
    "arcface_64_m8": ["--dim", "64", "--m-per-class", "8", "--batch-size", "32"],
    "ce_64": ["--dim", "64", "--loss", "ce", "--lr", "0.003"],
    "center_ce_arcface_128": ["--dim", "128", "--loss", "0.1*center+ce+arcface", "--augment"],
    "center_ce_arcface_128_3": ["--dim", "128", "--loss", "0.1*center+ce+arcface", "--augment", "--epochs", "3", "--lr", "0.002"],
}


def mltk(*args: str, cwd: Path) -> None:
    print("mltk", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "mltk", *args], check=True, cwd=cwd)


def screenshots(report: Path, compare: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 2000})
        page.goto(report.resolve().as_uri())
        page.screenshot(path=FIGURES / "report.png")
        top = page.locator("h2", has_text="Worst queries").bounding_box()["y"]  # from the page's top: nothing is scrolled
        classes = page.locator(".box").bounding_box()
        page.screenshot(path=FIGURES / "report_worst.png", full_page=True, clip={"x": 0, "y": top - 20, "width": 1280, "height": classes["y"] + classes["height"] - top + 40})
        page = browser.new_page(viewport={"width": 1920, "height": 1080})
        page.goto(compare.resolve().as_uri())
        page.screenshot(path=FIGURES / "compare.png")
        browser.close()
    for name in ("report.png", "report_worst.png", "compare.png"):
        print("written", FIGURES / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, help="where the run directories go (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = (args.runs or Path(scratch)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        for name, changes in RUNS.items():  # run names as a user types them, in the folder that holds the runs
            if not (root / name / "last.pt").is_file():
                mltk("run", *COMMON, *changes, "--out", name, cwd=root)
            mltk("evaluate", name, "--workers", "0", cwd=root)
        mltk("compare", *RUNS, "--out", "compare.html", cwd=root)
        screenshots(root / list(RUNS)[-1] / "eval" / "report.html", root / "compare.html")


if __name__ == "__main__":
    main()
