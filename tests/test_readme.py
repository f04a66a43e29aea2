"""README.md as a newcomer reads it: its first commands, run as written on the bundled digits, end in a report
(tests/readme_walkthrough.sh; run it without --installed for the whole walk from a fresh clone); and what a newcomer
reads or is told to run works from a clone of the repository, with nothing outside it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

WALK = REPO / "tests" / "readme_walkthrough.sh"


def test_the_readme_s_first_commands_end_in_a_report_as_written(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # this mltk
    result = subprocess.run(["bash", str(WALK), "--installed"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    ran = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert [line.split()[:2] for line in ran] == [["mltk", "run"], ["mltk", "evaluate"]], ran
    report = Path(result.stdout.strip().splitlines()[-1].removeprefix("report: "))
    assert report.is_relative_to(tmp_path) and report.stat().st_size > 10_000
    assert report == tmp_path / "runs" / "digits" / "eval" / "report.html"  # where the README says it is


def test_the_walk_starts_with_the_install_line_and_ends_with_the_tests():
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)[1].splitlines()
    assert block[0].startswith("pip install -c constraints.txt '.[dev]'") and block[-1].startswith("pytest")


def texts(*patterns: str) -> list[Path]:
    skip = ("build", ".egg-info", "__pycache__")
    return [p for pattern in patterns for p in sorted(REPO.glob(pattern)) if p.is_file() and not any(s in str(p) for s in skip)]


READ = texts("README.md", "docs/**/*.md", "examples/**/*", "plugins/*/README.md")


@pytest.mark.parametrize("path", READ, ids=[str(p.relative_to(REPO)) for p in READ])
def test_what_a_newcomer_reads_names_no_data_outside_the_repository(path):
    """Tests and benchmarks find real data beside the repository (as CI does); docs and examples never send a user there."""
    found = [line for line in path.read_text().splitlines() if re.search(r"\.\./shared|/work/shared|shared/data", line)]
    assert found == []


@pytest.mark.parametrize("path", READ + texts("mltk/**/*.py", "plugins/*/*/*.py"), ids=lambda p: str(p.relative_to(REPO)))
def test_every_install_hint_works_from_a_clone(path):
    """PyPI's `mltk` is another project and mltk-mlflow is not published: install from the clone, or the package itself."""
    found = [line for line in path.read_text().splitlines() if re.search(r"pip install '?mltk(\[|-mlflow|-gem|-efficientnet)", line)]
    assert found == []
