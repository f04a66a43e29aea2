#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ at the repo root (run HERE, where PyPI is reachable).
#
#     bash benchmarks/gpu_wheels.sh
#
# The GPU machine (Python 3.12, torch, timm, numpy, numba, scikit-learn, ... but no network) misses
# mltk's dependencies below; benchmarks/gpu_run.sh installs them from .whl/ with pip --no-index.
# Pinned to the versions installed here, so the GPU run uses what the CPU tests used. faiss-gpu's wheel
# (135 MB) is too big to travel (64 MiB a call), so faiss-cpu of the same version goes instead: faiss then
# runs on the CPU there, and gpu_bench.py's PML side uses PML's torch kNN on the GPU (it records which).
# .whl/ is ignored through .git/info/exclude (not .gitignore): it is this workplace's, not the project's.
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."

WHEELS=(
    pytorch-metric-learning==2.9.0  # mltk's losses, miners, samplers
    faiss-cpu==1.15.1               # mltk.knn, mltk.index (faiss-gpu 1.15.1 here)
    umap-learn==0.5.12              # mltk.report's UMAP figure
    pynndescent==0.7.0              # umap-learn's dependency
)

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

# One version of each: a stale wheel of another version would stop the install there.
for spec in "${WHEELS[@]}"; do
    name="${spec%%==*}" version="${spec##*==}"
    stem="$(echo "$name" | tr - _)"
    for f in .whl/"$stem"-*.whl; do
        [[ "$f" == .whl/"$stem-$version"-* ]] || { echo "removing stale $f"; rm -f "$f"; }
    done
done
ls -l .whl
du -ch .whl/*.whl | tail -1
