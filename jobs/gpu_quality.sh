#!/usr/bin/env bash
# The model-zoo quality table on one GPU: every run below trains at the issue's image budget
# (4,558 steps of 64 = 291,712 images on mnist5k) in its own process, all at once (these models are
# far too small to fill a GPU alone), then each is scored with the dataset's classifier as
# backbone on 5,000 samples, from its EMA generator and from its raw generator (what EMA gives).
#   bash jobs/gpu_quality.sh DATA_DIR                   (a prepared mnist5k; repository root)
#   LF_QUALITY_STEPS=20 LF_CHECK_DEVICE=cpu bash jobs/gpu_quality.sh DATA_DIR   (a dry run on the CPU)
# Results: one JSON line per run in $WORK/results.jsonl and a table on stdout; LF_QUALITY_COPY=DIR
# also copies each run's scores and last sample grid there as soon as it is scored.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DATA=${1:?usage: gpu_quality.sh PREPARED_MNIST5K}
WORK=${LF_QUALITY_DIR:-$(mktemp -d /tmp/lf-quality-XXXX)}
STEPS=${LF_QUALITY_STEPS:-4558}
SAMPLES=${LF_QUALITY_SAMPLES:-5000}
DEVICE=${LF_CHECK_DEVICE:-cuda}
export WANDB_MODE=offline PYTHONUNBUFFERED=1
if [ "$DEVICE" = cuda ]; then GPU=(--gpus); else GPU=(); fi
mkdir -p "$WORK/runs" "$WORK/logs"

# name | preset | overrides (space-separated KEY=VALUE)
RUNS=(
  "resnet|resnet-mnist|"
  "resnet+diffaug|resnet-diffaug-mnist|"
  "stylegan2|stylegan2-mnist|"
  "stylegan2 linear output (reference)|stylegan2-mnist|model.g_options.output=linear"
  "stylegan2 lr1e-3|stylegan2-mnist|gan.lr_g=1e-3 gan.lr_d=1e-3"
  "stylegan2+diffaug|stylegan2-mnist|gan.augment=diffaugment gan.diffaugment_policy=[translation,cutout]"
  "stylegan2+diffaug lr1e-3|stylegan2-mnist|gan.augment=diffaugment gan.diffaugment_policy=[translation,cutout] gan.lr_g=1e-3 gan.lr_d=1e-3"
  "stylegan2+ada|stylegan2-mnist|gan.augment=ada"
  "stylegan2+diffaug gamma0.1|stylegan2-mnist|gan.augment=diffaugment gan.diffaugment_policy=[translation,cutout] gan.r1_weight=0.1"
  "stylegan2+diffaug eager R1|stylegan2-mnist|gan.augment=diffaugment gan.diffaugment_policy=[translation,cutout] gan.r1_interval=1"
  "stylegan2+diffaug hinge|stylegan2-mnist|gan.augment=diffaugment gan.diffaugment_policy=[translation,cutout] gan.loss=hinge"
  "stylegan2+diffaug pl2|stylegan2-mnist|gan.augment=diffaugment gan.diffaugment_policy=[translation,cutout] gan.pl_weight=2"
  "stylegan2+diffaug w32|stylegan2-mnist|gan.augment=diffaugment gan.diffaugment_policy=[translation,cutout] model.g_width=32 model.d_width=32"
  "stylegan2+diffaug mixing0.9|stylegan2-mnist|gan.augment=diffaugment gan.diffaugment_policy=[translation,cutout] model.g_options.style_mixing=0.9"
  "stylegan2+diffaug map8|stylegan2-mnist|gan.augment=diffaugment gan.diffaugment_policy=[translation,cutout] model.g_options.mapping_layers=8"
  "stylegan2 paper regularisers|stylegan2-mnist|model.g_options.style_mixing=0.9 gan.pl_weight=2"
  "dcgan|dcgan-mnist|"
)
PARALLEL=${LF_QUALITY_PARALLEL:-${#RUNS[@]}}  # all at once by default: a batch that waits for a slow run holds the rest back
# scoring runs on the CPU (evaluate loads checkpoints there), up to PARALLEL at once: one thread each,
# not one per core each
EVAL_THREADS=${LF_EVAL_THREADS:-1}

"$PY" - "$DEVICE" <<'PYEOF'
import sys, torch
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device (LF_CHECK_DEVICE=cpu for a dry run)"
    print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, flush=True)
PYEOF

t0=$(date +%s)
DEADLINE=${LF_QUALITY_DEADLINE:-100000}  # seconds a training may run; a run stopped by it is scored at its last checkpoint
COPY=${LF_QUALITY_COPY:-}  # a folder to copy each run's result and sample grid to as soon as it is scored
run_one() {  # index, name, preset, overrides: train, then score the EMA and the raw generator
  local j=$1 name=$2 preset=$3 overrides=$4 sets=() kv
  local -a words; read -r -a words <<< "$overrides"  # split on spaces only: no globbing of [a,b] lists
  for kv in "${words[@]}"; do sets+=(--set "$kv"); done
  echo "$name" > "$WORK/logs/run$j.name"
  timeout "$DEADLINE" "$PY" -m latentforge.cli train "$preset" --data "$DATA" --workers 0 "${GPU[@]}" --steps "$STEPS" \
      --set train.tracking=none --set train.checkpoint_every=$(( STEPS / 2 > 0 ? STEPS / 2 : 1 )) \
      --set train.sample_every="$STEPS" --set train.log_every=$(( STEPS / 4 > 0 ? STEPS / 4 : 1 )) --set train.threads=1 \
      "${sets[@]}" --out "$WORK/runs/run$j" --json > "$WORK/logs/run$j.log" 2>&1 || echo "run $j ($name) stopped: $?"
  for ema in ema raw; do
    flag=(); [ "$ema" = raw ] && flag=(--no-ema)
    OMP_NUM_THREADS=$EVAL_THREADS "$PY" -m latentforge.cli evaluate "$WORK/runs/run$j" --data "$DATA" --samples "$SAMPLES" "${flag[@]}" --json \
        2> "$WORK/logs/eval$j-$ema.err" | tail -n 1 > "$WORK/logs/eval$j-$ema.json" || true
  done
  if [ -n "$COPY" ]; then
    mkdir -p "$COPY"
    cp "$WORK/logs/run$j".* "$WORK/logs/eval$j"-*.json "$COPY/" 2>/dev/null || true
    cp "$(ls "$WORK/runs/run$j/samples/"*.png 2>/dev/null | tail -n 1)" "$COPY/run$j.png" 2>/dev/null || true
  fi
  echo "run $j ($name) done at $(( $(date +%s) - t0 )) s"
}
i=0
for spec in "${RUNS[@]}"; do
  IFS='|' read -r name preset overrides <<< "$spec"
  run_one "$i" "$name" "$preset" "$overrides" &
  i=$((i + 1))
  if (( i % PARALLEL == 0 )); then wait; fi
done
wait
echo "== trained and scored ${#RUNS[@]} runs in $(( $(date +%s) - t0 )) s"

"$PY" - "$WORK" "$i" <<'PYEOF'
import json, sys
work, n = sys.argv[1], int(sys.argv[2])
out = open(f"{work}/results.jsonl", "w")
print(f"{'run':34s} {'FID':>7s} {'prec':>6s} {'recall':>6s} {'FID raw':>8s} {'img/s':>7s}")
for j in range(n):
    name = open(f"{work}/logs/run{j}.name").read().strip()
    row = {"name": name}
    try:
        row["train"] = json.loads(open(f"{work}/logs/run{j}.log").read().strip().splitlines()[-1])
        row["ema"] = json.loads(open(f"{work}/logs/eval{j}-ema.json").read())
        row["raw"] = json.loads(open(f"{work}/logs/eval{j}-raw.json").read())
    except Exception as e:  # a run that failed: say so and go on
        print(f"{name:34s} failed: {type(e).__name__}: {e}")
        print("".join(open(f"{work}/logs/run{j}.log").read().splitlines(True)[-5:]))
        out.write(json.dumps(row) + "\n")
        continue
    out.write(json.dumps(row) + "\n")
    from latentforge.metrics.registry import metric_values  # evaluate's keys name the protocol
    e, r, t = metric_values(row["ema"]), metric_values(row["raw"]), row["train"]
    print(f"{name:34s} {e['fid']:7.2f} {e.get('precision', float('nan')):6.3f} {e['recall']:6.3f} {r['fid']:8.2f} "
          f"{t.get('images_per_sec', float('nan')):7.0f}")
PYEOF
