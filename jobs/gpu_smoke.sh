#!/usr/bin/env bash
# GPU smoke test: a short DCGAN training on one GPU through Ray Train (NCCL, CUDA device), then
# the train benchmark on the GPU. Prints images/s; takes under 5 minutes on one H100/A100.
#   bash jobs/gpu_smoke.sh            (from the repository root, with latentforge installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${LF_SMOKE_DIR:-$(mktemp -d /tmp/lf-gpu-XXXX)}
export WANDB_MODE=offline RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: run this on a GPU machine"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PYEOF
"$PY" -m latentforge.cli data prepare mnist5k --out "$WORK/data"
"$PY" -m latentforge.cli train dcgan-mnist --data "$WORK/data" --workers 1 --gpus --steps 300 \
    --set train.log_every=50 --set train.tracking=none --storage "$WORK/runs" --out gpu-smoke
"$PY" -m latentforge.cli generate "$WORK/runs/gpu-smoke" --n 64 --seed 0 --out "$WORK/gpu-samples.png"
"$PY" -m latentforge.cli bench train --gpus --data "$WORK/data" --warmup 20 --steps 200 --json
echo "samples: $WORK/gpu-samples.png"
