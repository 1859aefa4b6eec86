#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU (not run in the session that wrote it: no GPU was available).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, after `make venv`
#
# 1. the device tests (tests/test_device_readiness.py) with PRISMREC_TEST_DEVICE=cuda: every model trains a
#    step with each loss and is evaluated on the GPU, a CPU tensor made in a forward pass fails, and the GPU
#    evaluators agree with the CPU ones;
# 2. one MovieLens DMESR training (SASRec backbone, max_len 50, 3 epochs) on CUDA in fp32 and in bf16, each
#    printing its mean epoch time, plus the same on the CPU for comparison (1 epoch).
#
# The venv from requirements.lock has the CPU build of torch; the script stops with the command to install a
# CUDA build when torch cannot see a GPU. Output: gpu_check.log beside this script's results
# (benchmarks/results/gpu_check.log) and the printed summary.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PRISMREC_HOME="${PRISMREC_HOME:-$PWD}"
LOG=benchmarks/results/gpu_check.log
mkdir -p benchmarks/results

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device." >&2
    echo "Install a CUDA build of the locked torch version, e.g.:" >&2
    echo "  .venv/bin/pip install --index-url https://download.pytorch.org/whl/cu124 torch==\$(.venv/bin/python -c 'import torch; print(torch.__version__.split(\"+\")[0])')" >&2
    exit 2
fi

{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

    echo "## device tests on cuda"
    PRISMREC_TEST_DEVICE=cuda "$PY" -m pytest -q tests/test_device_readiness.py

    if [ ! -f "$PRISMREC_HOME/semantics/movielens-small-describe/embeddings.safetensors" ]; then
        echo "## deriving MovieLens semantics (describe backend)"
        .venv/bin/prismrec derive movielens-small
    fi

    for variant in "cuda fp32 3" "cuda bf16 3" "cpu fp32 1"; do
        set -- $variant
        device=$1 precision=$2 epochs=$3
        name="gpu-check-dmesr-$device-$precision"
        echo "## MovieLens DMESR on $device ($precision, $epochs epochs)"
        .venv/bin/prismrec train --config configs/movielens_dmesr_sasrec.toml \
            --set "training.device='$device'" --set "training.precision='$precision'" \
            --set "training.max_epochs=$epochs" --set model.max_len=50 --set "name='$name'" --quiet
        run_dir=$(ls -dt "$PRISMREC_HOME/runs/$name"-* | head -1)
        "$PY" - "$run_dir" "$device" "$precision" <<'EOF'
import json, sys
from pathlib import Path
run, device, precision = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
seconds = [e["train_seconds"] for e in epochs]
final = json.loads((run / "final.json").read_text())["metrics"]
print(f"RESULT {device} {precision}: epoch s {sum(seconds) / len(seconds):.2f} (epochs {len(seconds)}; "
      f"first {seconds[0]:.2f}), test sampled N@10 {final['test/sampled']['ndcg@10']:.4f}, "
      f"test full N@10 {final['test/full']['ndcg@10']:.4f}")
EOF
    done
} 2>&1 | tee "$LOG"
grep '^RESULT' "$LOG"
