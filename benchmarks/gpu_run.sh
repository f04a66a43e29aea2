#!/usr/bin/env bash
# Issue 16 in one go on the GPU machine: install what it lacks, `pytest -m gpu`, the GPU benchmark.
#
#     bash benchmarks/gpu_run.sh "$OUT"                    # there, from the repo root, with .whl/ carried
#     GPU_RUN_SMOKE=1 bash benchmarks/gpu_run.sh /tmp/gr   # its logic here on the CPU: the GPU tests skip,
#                                                          # the benchmark runs --smoke, nothing is installed
#
# Everything lands flat in OUT (at most 8 files): env.txt (machine, versions, install, phase exit codes),
# pytest.log, junit.xml, gpu_tests.jsonl (what tests/test_gpu.py reports through MLTK_GPU_REPORT),
# bench.log, gpu_bench.json, gpu_bench.md. The whole run fits in GPU_RUN_SECONDS (default 465: the
# machine's 8 minutes less a margin); each phase runs under `timeout`, so a hung one leaves the others
# their time: the tests get at most 240 s and never the benchmark's last 210 s. Wheels for the packages the
# machine lacks come from benchmarks/gpu_wheels.sh (run where PyPI is reachable); mltk itself is used from
# this working tree (PYTHONPATH), no network needed.
set -uo pipefail
OUT="${1:?usage: bash benchmarks/gpu_run.sh OUT_FOLDER}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."

START=$SECONDS
TOTAL=${GPU_RUN_SECONDS:-465}
SMOKE=${GPU_RUN_SMOKE:-}
export PYTHONUNBUFFERED=1 MLTK_GPU_REPORT="$OUT/gpu_tests.jsonl"
left() { echo $((TOTAL - (SECONDS - START))); }
say() { echo "[gpu_run $((SECONDS - START))s] $*" | tee -a "$OUT/env.txt"; }
: >"$OUT/env.txt"

# -- install: the wheels into /tmp/site, mltk from this tree --------------------------------------------
site=/tmp/site
if [[ -n "$SMOKE" ]]; then  # check the wheels install, but keep this machine's own packages on the path
    site="$(mktemp -d)"
    trap 'rm -rf "$site"' EXIT
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl >>"$OUT/env.txt" 2>&1
    say "install .whl/*.whl into $site: exit $? ($(ls .whl | tr '\n' ' '))"
else
    say "no .whl/ here: run benchmarks/gpu_wheels.sh first where PyPI is reachable (if this machine lacks them)"
fi
if [[ -z "$SMOKE" ]]; then
    export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# -- the machine and the versions -----------------------------------------------------------------------
{
    echo "== date: $(date -u +%FT%TZ)  host: $(hostname)  smoke: ${SMOKE:-no}  budget: ${TOTAL}s"
    echo "== commit: $(git rev-parse HEAD 2>/dev/null || echo 'no git here')"
    echo "== nvidia-smi"; timeout 30 nvidia-smi 2>&1 || echo "(no nvidia-smi)"
    echo "== lscpu"; lscpu 2>/dev/null | grep -E '^(Model name|CPU\(s\))' ; free -g 2>/dev/null | head -2
    echo "== python"
    timeout 120 python3 - <<'EOF' 2>&1
import importlib, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "gpu available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0), "bf16", torch.cuda.is_bf16_supported())
print("allow_tf32", torch.backends.cuda.matmul.allow_tf32, "float32_matmul_precision", torch.get_float32_matmul_precision())
for name in ("mltk", "torchvision", "timm", "pytorch_metric_learning", "faiss", "umap", "pynndescent", "numba", "numpy", "sklearn", "onnx", "onnxruntime", "pytest"):
    try:
        module = importlib.import_module(name)
        print(f"{name:24s} {getattr(module, '__version__', '?'):12s} {module.__file__}")
    except Exception as exc:
        print(f"{name:24s} MISSING: {exc}")
try:
    import faiss
    print("faiss GPUs", faiss.get_num_gpus())
except Exception:
    pass
EOF
} >>"$OUT/env.txt" 2>&1

# -- pytest -m gpu ----------------------------------------------------------------------------------------
tests_limit=$(( $(left) - 210 ))
((tests_limit > 240)) && tests_limit=240
if ((tests_limit >= 30)); then  # (timeout 0 would mean no limit at all)
    say "pytest -m gpu: limit ${tests_limit}s"
    timeout -k 10 "$tests_limit" python3 -m pytest -m gpu tests -o addopts= -p no:cacheprovider --continue-on-collection-errors \
        --junitxml="$OUT/junit.xml" -ra 2>&1 | tee "$OUT/pytest.log"
    tests_rc=${PIPESTATUS[0]}
else
    tests_rc=3 tests_limit=0
fi
case $tests_rc in
    0) note="passed" ;; 3) note="SKIPPED: no time left for them" ;; 5) note="no test selected" ;; 124|137) note="TIMED OUT after ${tests_limit}s" ;; *) note="FAILED" ;;
esac
say "pytest -m gpu: exit $tests_rc ($note)"

# -- the benchmark ---------------------------------------------------------------------------------------
bench_limit=$(( $(left) - 5 ))
((bench_limit < 60)) && bench_limit=60  # the benchmark records what it had no time for
say "gpu_bench.py: limit ${bench_limit}s"
timeout -k 15 "$bench_limit" python3 benchmarks/gpu_bench.py --out "$OUT" --budget $((bench_limit - 15)) ${SMOKE:+--smoke} 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
say "gpu_bench.py: exit $bench_rc$([[ $bench_rc == 124 || $bench_rc == 137 ]] && echo ' (TIMED OUT)')"
if [[ -z "$SMOKE" && -f "$OUT/gpu_bench.json" ]]; then
    cp "$OUT/gpu_bench.json" "$OUT/gpu_bench.md" benchmarks/results/ && say "copied gpu_bench.{json,md} into benchmarks/results/"
fi

say "done in $((SECONDS - START))s: tests exit $tests_rc, bench exit $bench_rc; files: $(ls "$OUT" | tr '\n' ' ')"
[[ ($tests_rc == 0 || $tests_rc == 5) && $bench_rc == 0 ]]
