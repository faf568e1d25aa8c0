#!/usr/bin/env bash
# GPU check, in minutes: one GPU, the fast path (bf16 + channels_last + torch.compile). The bench
# (3.) runs first and its numbers are printed at once; every stage runs under LF_STAGE_TIMEOUT (300 s).
#   1. a GAN and a VAE trained through Ray Train on one GPU worker with periodic evaluation
#      (the VAE's evaluation is where CPU data used to meet a CUDA model),
#   2. a grid generated from the GAN in the precision it trained in, and both scored on 5,000
#      samples, on the GPU (`--device cuda`); the GAN's editing measured with its projections there,
#   3. `bench train --gpus` (fp32 / bf16 / bf16+channels_last / +compile, plain loop only),
#   4. a 2-trial Ray Tune sweep with `tune --gpus` (one GPU: the trials run one at a time),
#   5. the Serve application answering generate and reconstruct requests, its Generator and Editor
#      replicas sharing the GPU,
# then images/s and the fraction of the GPU's published dense peak that each bench mode reached
# (bf16 modes against the bf16 tensor-core peak, fp32 against the fp32 peak: TF32 is off by default).
# A stage that fails is reported and the next one runs (a GPU session may allow one try); the
# script exits non-zero if any stage failed.
#   bash jobs/gpu_check.sh                      (repository root, latentforge installed)
#   LF_GPU_PEAK_TFLOPS=989 bash jobs/gpu_check.sh   (the card's dense bf16 peak, where the name is not
#                                                  recognised; H100 SXM / H200 989, H100 PCIe 756, A100 312)
#   LF_CHECK_DEVICE=cpu bash jobs/gpu_check.sh  (a dry run of the same steps on the CPU, smaller)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${LF_CHECK_DIR:-$(mktemp -d /tmp/lf-gpu-check-XXXX)}
DEVICE=${LF_CHECK_DEVICE:-cuda}
export WANDB_MODE=offline RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
if [ "$DEVICE" = cuda ]; then GPU=(--gpus); STEPS=${LF_CHECK_STEPS:-400}; else GPU=(); STEPS=${LF_CHECK_STEPS:-20}; fi
FAST=(--set train.precision=bf16 --set train.channels_last=true --set train.compile=true --set train.tracking=none)
t0=$(date +%s)
FAILED=()
stage() {  # name, command...: run a stage; a failure is recorded and said, and the script goes on
  local name=$1; shift
  if ! "$@"; then FAILED+=("$name"); echo "!! stage failed: $name (the next stages still run)"; fi
}
# every stage's command under a time limit: one that hangs (a Ray or Serve start) must not use up a
# GPU session whose numbers come from the later stages
LIMIT=${LF_STAGE_TIMEOUT:-300}
case $LIMIT in ''|*[!0-9]*) echo "LF_STAGE_TIMEOUT must be whole seconds (got '$LIMIT')" >&2; exit 2 ;; esac
# --foreground: the stage stays in this script's process group, so Ctrl-C reaches it (and stops it)
PYT=(timeout --foreground -k 10 "$LIMIT" "$PY")
PYT_LONG=(timeout --foreground -k 10 "$(( LIMIT * 2 ))" "$PY")  # the sweep: Tune's start and two trials
trap 'echo "interrupted"; exit 130' INT
RUNS="$WORK/runs-$(date +%s)"  # a rerun in the same LF_CHECK_DIR writes beside the last one, never into it
summary() {
"$PY" - "$WORK" "$DEVICE" "${LF_GPU_PEAK_TFLOPS:-}" <<'PYEOF'
import json, os, sys
work, device, given = sys.argv[1], sys.argv[2], sys.argv[3]
# published dense peaks in TFLOP/s, (bf16 tensor cores, fp32 without TF32), from NVIDIA's data sheets
# (matched in this order: the longer names first, "L40S" before "L40" before "L4")
PEAKS = {"H100 PCIe": (756, 51), "H100 NVL": (835, 60), "H100": (989, 67), "H200 NVL": (835, 60), "H200": (989, 67), "A100": (312, 19.5),
         "L40S": (362, 91.6), "L40": (181, 90.5), "L4": (121, 30.3)}
peaks = None
if device == "cuda":
    import torch
    name = torch.cuda.get_device_name(0)
    peaks = next((v for k, v in PEAKS.items() if k in name), None)
    if given:
        peaks = (float(given), peaks[1] if peaks else float("nan"))
    print(f"device {name}: published dense peaks "
          + (f"bf16 {peaks[0]:g}, fp32 {peaks[1]:g} TFLOP/s" if peaks else "unknown (set LF_GPU_PEAK_TFLOPS)"))


def result(name: str) -> dict | None:
    """The JSON a stage left in $WORK/name.json, or None where the stage failed before writing it."""
    try:
        return json.load(open(f"{work}/{name}.json"))
    except (OSError, ValueError):
        return None


for preset in ("dcgan-mnist", "vae-mnist"):
    r = result(preset)
    if r is None:
        print(f"{preset}: no result (its stage failed)")
        continue
    evals = {k: round(r[k], 3) for k in ("fid", "recall", "recon_psnr") if k in r}
    print(f"{preset}: step {r['step']}, {r['images_per_sec']:.0f} images/s (Ray Train, 1 worker), eval {evals}")
bench = result("bench")
if bench is None:
    print("bench: no result (its stage failed)")
for mode, m in (bench or {}).get("modes", {}).items():
    frac = ""
    peak = None if not peaks else peaks[0] if mode.startswith("bf16") else peaks[1]
    if peak == peak and peak:  # known (a card outside the table with LF_GPU_PEAK_TFLOPS has no fp32 peak)
        frac = f", {m['gflops'] / (peak * 1e3):.2%} of the published {'bf16' if mode.startswith('bf16') else 'fp32'} peak"
    print(f"bench {mode}: {m['images_per_s']:.0f} images/s, {m['gflops']:.0f} GFLOP/s, x{m['speedup_over_fp32']:.2f} vs fp32, "
          f"first step {m['first_step_s']:.1f} s{frac}")
PYEOF
}

"$PY" - "$DEVICE" <<'PYEOF' || exit 1
import sys, torch
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device: run this on a GPU machine (or LF_CHECK_DEVICE=cpu for a dry run)"
    print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
else:
    print("device: CPU dry run | torch", torch.__version__)
PYEOF

echo "== data"
[ -f "$WORK/data/manifest.json" ] || "$PY" -m latentforge.cli data prepare mnist5k --out "$WORK/data" || exit 1  # every stage needs it
echo "== bench train (first: its numbers are what a short GPU session is for)"
bench() {
  if [ "$DEVICE" = cuda ]; then
    "${PYT[@]}" -m latentforge.cli bench train --gpus --no-ray --data "$WORK/data" --warmup 20 --steps 200 \
        --set train.global_batch_size=1024 \
        --modes fp32,bf16,bf16+channels_last,bf16+channels_last+compile --json | tail -n 1 > "$WORK/bench.json"
  else
    "${PYT[@]}" -m latentforge.cli bench train --no-ray --data "$WORK/data" --warmup 2 --steps 5 --modes fp32,bf16 --json \
        | tail -n 1 > "$WORK/bench.json"
  fi
}
stage "bench train" bench
summary | grep -E "^(device|bench)" || true  # printed now, in case a later stage hangs
echo "== train a GAN and a VAE: 1 Ray Train worker, bf16 + channels_last + compile, periodic evaluation"
train() {  # preset: the last line of --json (the final record) into $WORK/preset.json
  "${PYT[@]}" -m latentforge.cli train "$1" --data "$WORK/data" --workers 1 "${GPU[@]}" --steps "$STEPS" \
      "${FAST[@]}" --set train.log_every=50 --set train.eval_every=$((STEPS / 2)) --set train.eval_samples=1000 \
      --set train.checkpoint_every="$STEPS" --out "$RUNS/$1" --json | tail -n 1 > "$WORK/$1.json"
}
for preset in dcgan-mnist vae-mnist; do stage "train $preset" train "$preset"; done
echo "== generate and evaluate on the device"
stage generate "${PYT[@]}" -m latentforge.cli generate "$RUNS/dcgan-mnist" --n 64 --seed 0 --device "$DEVICE" \
    --out "$WORK/samples.png"
for preset in dcgan-mnist vae-mnist; do
  stage "evaluate $preset" "${PYT[@]}" -m latentforge.cli evaluate "$RUNS/$preset" --data "$WORK/data" --samples 5000 \
      --device "$DEVICE"
done
echo "== edit-eval on the device (projections of validation images)"
stage "edit-eval" "${PYT[@]}" -m latentforge.cli edit-eval "$RUNS/dcgan-mnist" --data "$WORK/data" --images 16 \
    --project-steps 50 --device "$DEVICE"
echo "== a 2-trial sweep, each trial's worker on the device"
sweep() {
  cat > "$WORK/sweep.yaml" <<YAML
name: gpu-check-sweep
base: dcgan-mnist
overrides: {train.precision: bf16, train.channels_last: true}
space:
  gan.lr_g: {choice: [1.0e-4, 2.0e-4]}
trials: 2
max_concurrent: 2
steps: $((STEPS / 4 > 4 ? STEPS / 4 : 4))
eval_every: $((STEPS / 8 > 2 ? STEPS / 8 : 2))
eval_samples: 500
scheduler: {kind: fifo}
YAML
  "${PYT_LONG[@]}" -m latentforge.cli tune "$WORK/sweep.yaml" --data "$WORK/data" "${GPU[@]}" --out "$RUNS/sweep" --no-promote
}
stage tune sweep
echo "== serve generate and reconstruct requests"
stage "registry promote" "${PYT[@]}" -m latentforge.cli registry promote "$RUNS/dcgan-mnist" --registry "$RUNS/registry" --name gan
serve_one() {
"${PYT[@]}" - "$RUNS/registry" "$DEVICE" <<'PYEOF'
import json, sys, time, urllib.request
from latentforge.serve.config import ServeConfig
from latentforge.serve.runner import start_serve
# on a GPU, the Generator and Editor replicas share it (replica_gpus, editor_gpus): generation and
# the Editor's projections of images run there
share = 0.5 if sys.argv[2] == "cuda" else 0
url = start_serve(ServeConfig(registry=sys.argv[1], replica_gpus=share, editor_gpus=share), port=8123)


def post(route, body):
    req = urllib.request.Request(f"{url}/v1/models/gan/{route}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read()), time.perf_counter() - t


for what in ("first request (loads the model)", "second request"):
    body, took = post("generate", {"n": 4, "seed": 1})
    print(f"{what}: {len(body['images'])} images in {took:.2f} s")
for what in ("first reconstruct (loads the model)", "second reconstruct"):
    rec, took = post("reconstruct", {"image": body["images"][0]})  # a projection: 200 steps x 2 starts
    print(f"{what}: projected one image in {took:.2f} s, mse {rec['mse']:.3g} (pixels in [-1, 1])")
from ray import serve
serve.shutdown()
PYEOF
}
stage serve serve_one

echo "== summary"
stage summary summary
echo "samples: $WORK/samples.png; all outputs in $WORK; $(( $(date +%s) - t0 )) s in all"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf '!! failed stages:'; printf ' [%s]' "${FAILED[@]}"; echo
  exit 1
fi
echo "all stages passed"
