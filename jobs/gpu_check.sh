#!/usr/bin/env bash
# GPU check, in minutes: one GPU, the fast path (bf16 + channels_last + torch.compile).
#   1. a GAN and a VAE trained through Ray Train on one GPU worker with periodic evaluation
#      (the VAE's evaluation is where CPU data used to meet a CUDA model),
#   2. a grid generated from the GAN in the precision it trained in,
#   3. `bench train --gpus` (fp32 / bf16 / bf16+channels_last / +compile, plain loop only),
#   4. the Serve application answering one generate request,
# then images/s and the fraction of the GPU's published dense bf16 peak that training reached.
#   bash jobs/gpu_check.sh                      (repository root, latentforge installed)
#   LF_GPU_PEAK_TFLOPS=989 bash jobs/gpu_check.sh   (the card's dense bf16 peak; H100 SXM 989, H200 989, A100 312)
#   LF_CHECK_DEVICE=cpu bash jobs/gpu_check.sh  (a dry run of the same steps on the CPU, smaller)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${LF_CHECK_DIR:-$(mktemp -d /tmp/lf-gpu-check-XXXX)}
DEVICE=${LF_CHECK_DEVICE:-cuda}
export WANDB_MODE=offline RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
if [ "$DEVICE" = cuda ]; then GPU=(--gpus); STEPS=${LF_CHECK_STEPS:-400}; else GPU=(); STEPS=${LF_CHECK_STEPS:-20}; fi
FAST=(--set train.precision=bf16 --set train.channels_last=true --set train.compile=true --set train.tracking=none)
t0=$(date +%s)

"$PY" - "$DEVICE" <<'PYEOF'
import sys, torch
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device: run this on a GPU machine (or LF_CHECK_DEVICE=cpu for a dry run)"
    print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
else:
    print("device: CPU dry run | torch", torch.__version__)
PYEOF

echo "== data"
"$PY" -m latentforge.cli data prepare mnist5k --out "$WORK/data"
echo "== train a GAN and a VAE: 1 Ray Train worker, bf16 + channels_last + compile, periodic evaluation"
for preset in dcgan-mnist vae-mnist; do
  "$PY" -m latentforge.cli train "$preset" --data "$WORK/data" --workers 1 "${GPU[@]}" --steps "$STEPS" \
      "${FAST[@]}" --set train.log_every=50 --set train.eval_every=$((STEPS / 2)) --set train.eval_samples=1000 \
      --set train.checkpoint_every="$STEPS" --out "$WORK/runs/$preset" --json | tail -n 1 > "$WORK/$preset.json"
done
echo "== generate"
"$PY" -m latentforge.cli generate "$WORK/runs/dcgan-mnist" --n 64 --seed 0 --out "$WORK/samples.png"
echo "== bench train"
if [ "$DEVICE" = cuda ]; then
  "$PY" -m latentforge.cli bench train --gpus --no-ray --data "$WORK/data" --warmup 20 --steps 200 \
      --modes fp32,bf16,bf16+channels_last,bf16+channels_last+compile --json | tail -n 1 > "$WORK/bench.json"
else
  "$PY" -m latentforge.cli bench train --no-ray --data "$WORK/data" --warmup 2 --steps 5 --modes fp32,bf16 --json \
      | tail -n 1 > "$WORK/bench.json"
fi
echo "== serve one generate request"
"$PY" -m latentforge.cli registry promote "$WORK/runs/dcgan-mnist" --registry "$WORK/registry" --name gan
"$PY" - "$WORK/registry" <<'PYEOF'
import json, sys, time, urllib.request
from latentforge.serve.config import ServeConfig
from latentforge.serve.runner import start_serve
url = start_serve(ServeConfig(registry=sys.argv[1]), port=8123)
req = urllib.request.Request(f"{url}/v1/models/gan/generate", data=json.dumps({"n": 4, "seed": 1}).encode(),
                             headers={"content-type": "application/json"})
for what in ("first request (loads the model)", "second request"):
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        body = json.loads(r.read())
    print(f"{what}: {len(body['images'])} images in {time.perf_counter() - t:.2f} s")
from ray import serve
serve.shutdown()
PYEOF

echo "== summary"
"$PY" - "$WORK" "${LF_GPU_PEAK_TFLOPS:-0}" <<'PYEOF'
import json, sys
work, peak_tflops = sys.argv[1], float(sys.argv[2])
for preset in ("dcgan-mnist", "vae-mnist"):
    r = json.load(open(f"{work}/{preset}.json"))
    evals = {k: round(r[k], 3) for k in ("fid", "recall", "recon_psnr") if k in r}
    print(f"{preset}: step {r['step']}, {r['images_per_sec']:.0f} images/s (Ray Train, 1 worker), eval {evals}")
bench = json.load(open(f"{work}/bench.json"))
for mode, m in bench.get("modes", {}).items():
    frac = f", {m['gflops'] / (peak_tflops * 1e3):.2%} of the published bf16 peak" if peak_tflops else ""
    print(f"bench {mode}: {m['images_per_s']:.0f} images/s, {m['gflops']:.0f} GFLOP/s, x{m['speedup_over_fp32']:.2f} vs fp32, "
          f"first step {m['first_step_s']:.1f} s{frac}")
PYEOF
echo "samples: $WORK/samples.png; all outputs in $WORK; $(( $(date +%s) - t0 )) s in all"
