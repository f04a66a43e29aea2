#!/usr/bin/env bash
# Follow README.md as a newcomer does: run the lines of its first command block as written, one by
# one, up to the evaluation's report; then check that the report is there, whole and self-contained.
#
#   tests/readme_walkthrough.sh               in a fresh clone of this repository's last commit, with a new
#                                             virtual environment: the install line first, then the rest
#   tests/readme_walkthrough.sh --installed   the lines after the install line, in the current folder, with the
#                                             mltk on PATH (tests/test_readme.py runs this in a temporary folder)
#
# The block's `pytest` line is left out: the test suite is what runs this walk.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
readme="$repo/README.md"
install=0
if [[ "${1:-}" != "--installed" ]]; then
    work="$(mktemp -d)"
    echo "walking README.md in $work/mltk"
    git clone --quiet "$repo" "$work/mltk"
    # Packages this machine already has are reused (torch is large); pip fetches what it lacks, mltk itself from the clone.
    python -m venv --system-site-packages "$work/venv"
    # shellcheck disable=SC1091
    source "$work/venv/bin/activate"
    cd "$work/mltk"
    readme="README.md"
    install=1
fi

# The first ```bash block of the README, as written.
mapfile -t lines < <(awk '/^```bash$/ { n++; next } n == 1 && /^```$/ { exit } n == 1' "$readme")
[[ ${#lines[@]} -gt 0 ]] || { echo "README.md has no \`\`\`bash block" >&2; exit 1; }
started="$(mktemp)"
for line in "${lines[@]}"; do
    line="${line%%#*}"
    while [[ -n "${line// /}" ]]; do  # each command of a line joined by &&, in turn
        command="${line%%&&*}"
        [[ "$command" == "$line" ]] && line="" || line="${line#*&&}"
        read -r first second _ <<< "$command" || true
        [[ -n "${first:-}" ]] || continue
        [[ "$first" == pytest ]] && continue
        [[ "$first $second" == "pip install" && $install == 0 ]] && continue
        echo "+ $(echo $command)"
        eval "$command"
    done
done

# The report the walk ends on: one report.html written by it, a whole page with nothing to fetch.
mapfile -t reports < <(find . -name report.html -newer "$started")
rm -f "$started"
[[ ${#reports[@]} -eq 1 ]] || { echo "expected one report.html from the README's commands, found ${#reports[@]}" >&2; exit 1; }
report="${reports[0]}"
head -c 200 "$report" | grep -qi '<!doctype html>' || { echo "$report does not start as an HTML page" >&2; exit 1; }
tail -c 200 "$report" | grep -q '</html>' || { echo "$report is not whole (no </html>)" >&2; exit 1; }
if grep -Eq '<(script|img|link)[^>]+(src|href)="https?:' "$report"; then
    echo "$report fetches from the network; it should be self-contained" >&2
    exit 1
fi
echo "report: $(cd "$(dirname "$report")" && pwd)/report.html"
