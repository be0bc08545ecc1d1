#!/usr/bin/env bash
# GPU check of DRAMA in under 9 minutes on one CUDA GPU, without network:
#   1. tests/test_cuda.py (bf16 world-model loss on the GPU; mamba_ssm's kernel against ours when it is installed)
#   2. one update at the paper's batch, --precision auto, eager and --compile (benchmarks/training_step.py)
#   3. drama_xs.py on ALE/Krull-v5 at the paper's settings for 5 minutes: seconds per update, projected hours
#
# Usage, from anywhere:  bash benchmarks/gpu_check.sh [--device cpu]
#   --device cpu: a dry run of every step at tiny sizes on the CPU (checks the script itself, no GPU numbers)
#   WHEELS=/path/to/wheels: where the missing packages are installed from (default: wheels/ beside the checkout,
#   then wheels/ inside it). Make that folder on a machine with network and the GPU machine's Python version:
#     pip download -d wheels 'gymnasium>=1.0,<2' 'ale-py>=0.10.2' 'tyro>=0.8' tensorboard safetensors \
#       pillow matplotlib moviepy huggingface-hub pytest numpy
#   (for another Python or platform add e.g. --python-version 3.11 --platform manylinux_2_28_x86_64
#   --only-binary=:all:). torch itself is not installed from there: use the machine's CUDA build.
set -euo pipefail

DEVICE=cuda
if [[ "${1:-}" == "--device" && "${2:-}" == "cpu" ]]; then
    DEVICE=cpu
elif [[ $# -gt 0 ]]; then
    echo "error: unknown arguments '$*': use no arguments (GPU) or --device cpu (a dry run)" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"
TRAIN_SECONDS="${TRAIN_SECONDS:-$([[ $DEVICE == cuda ]] && echo 300 || echo 60)}"
LOG_DIR="$(mktemp -d)"
echo "# DRAMA GPU check ($(date -u +%Y-%m-%dT%H:%MZ)), logs in $LOG_DIR"

# 0. the packages: install only what is missing, from local wheels
MISSING=$("$PYTHON" - <<'EOF'
import importlib.util
need = {"gymnasium": "gymnasium>=1.0,<2", "ale_py": "ale-py>=0.10.2", "tyro": "tyro>=0.8",
        "tensorboard": "tensorboard", "safetensors": "safetensors", "PIL": "pillow", "matplotlib": "matplotlib",
        "moviepy": "moviepy", "huggingface_hub": "huggingface-hub", "pytest": "pytest", "numpy": "numpy"}
print(" ".join(f"'{spec}'" for module, spec in need.items() if importlib.util.find_spec(module) is None))
EOF
)
if [[ -n "$MISSING" ]]; then
    WHEELS="${WHEELS:-}"
    for candidate in "$ROOT/../wheels" "$ROOT/wheels"; do
        [[ -z "$WHEELS" && -d "$candidate" ]] && WHEELS="$candidate"
    done
    if [[ -z "$WHEELS" || ! -d "$WHEELS" ]]; then
        echo "error: missing $MISSING and no wheels/ folder beside the checkout: make one with pip download (see" \
            "the top of benchmarks/gpu_check.sh) or set WHEELS=/path" >&2
        exit 2
    fi
    echo "installing $MISSING from $WHEELS (no network)"
    eval "$PYTHON -m pip install --quiet --no-index --find-links '$WHEELS' $MISSING"
fi
"$PYTHON" - "$DEVICE" <<'EOF'
import sys
import torch
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit(f"error: torch {torch.__version__} sees no CUDA GPU: install a CUDA build of torch, or run --device cpu")
name = torch.cuda.get_device_name() if sys.argv[1] == "cuda" else "cpu (dry run)"
print(f"torch {torch.__version__}, device: {name}")
EOF

# 1. the CUDA tests (skipped on the CPU)
echo -e "\n## 1. tests/test_cuda.py"
"$PYTHON" -m pytest -q tests/test_cuda.py -p no:cacheprovider -rs

# 2. one update at the paper's batch, eager and compiled (the dry run: a tiny batch, one repeat)
if [[ "$DEVICE" == cuda ]]; then
    STEP_FLAGS=(--device cuda --repeats 3)
else
    STEP_FLAGS=(--device cpu --scale 0.02 --repeats 1 --buffer-steps 300 --threads 2)
fi
for compile in "" "--compile"; do
    echo -e "\n## 2. one update, --precision auto ${compile:-(eager)}"
    "$PYTHON" benchmarks/training_step.py "${STEP_FLAGS[@]}" --precision auto --variants drama_xs --no-extras \
        $compile 2>&1 | tee "$LOG_DIR/update${compile}.txt" | grep -E "^- (device|precision)|^\| = |rollout:|projected"
done

# 3. five minutes of real training on Krull at the paper's settings: seconds per update from the progress lines
echo -e "\n## 3. drama_xs.py on ALE/Krull-v5, paper settings, ${TRAIN_SECONDS} s"
if [[ "$DEVICE" == cuda ]]; then
    TRAIN_FLAGS=(--device cuda)
else  # a small model and batch, and few random steps, so that the CPU reaches updates within the time limit
    TRAIN_FLAGS=(--device cpu --random-steps 64 --sequence-length 32 --batch-size 2 --imagine-batch-size 16
        --d-model 64 --headdim 32 --encoder-filters 4 8 8 8 8 --torch-threads 2)
fi
set +e
timeout "$TRAIN_SECONDS" "$PYTHON" -u drama_xs.py --env-id ALE/Krull-v5 --precision auto --total-timesteps 100000 \
    --eval-episodes 0 --no-save-model --checkpoint-every 0 --dream-every 0 --log-every 100000 "${TRAIN_FLAGS[@]}" \
    2>"$LOG_DIR/train.err" | while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done \
    | tee "$LOG_DIR/train.txt" | cut -d' ' -f2-
status=${PIPESTATUS[0]}
set -e
if [[ $status -ne 0 && $status -ne 124 ]]; then
    echo "error: training exited with status $status:" >&2
    tail -5 "$LOG_DIR/train.err" >&2
    exit 1
fi
"$PYTHON" - "$LOG_DIR/train.txt" <<'EOF'
import re
import sys
lines = []  # (time, step, updates) of the progress lines with updates > 0
for line in open(sys.argv[1]):
    match = re.match(r"(\S+) step (\d+)/(\d+) updates (\d+) ", line)
    if match and int(match[4]) > 0:
        lines.append((float(match[1]), int(match[2]), int(match[4]), int(match[3])))
if len(lines) < 2:
    sys.exit("error: fewer than two progress lines with updates: train longer (TRAIN_SECONDS=600)")
(t0, s0, u0, total), (t1, s1, u1, _) = lines[0], lines[-1]
per_update, per_step = (t1 - t0) / (u1 - u0), (t1 - t0) / (s1 - s0)
print(f"\nseconds per update (world model + actor-critic + act + env step): {per_update:.3f} "
      f"({u1 - u0} updates in {t1 - t0:.0f} s)")
print(f"projected hours for {total:,} steps at train_ratio 1: {total * per_step / 3600:.1f}")
EOF
