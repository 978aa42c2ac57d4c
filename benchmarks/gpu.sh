#!/usr/bin/env bash
# The GPU check: on a new machine with a CUDA GPU, does the main job run in every precision,
# and how fast? One command, under 8 minutes on an H100, from the repository root:
#
#   bash benchmarks/gpu.sh ../shared/data/tinystories/TinyStories-train.head-2MiB.txt
#
# The argument is a local TinyStories text file (the dataset's own format; a few MB is
# plenty). Parts, each with a PASS/FAIL line, then a table of tokens/s and MFU:
#   1. the main job: train.py model=small, hardware=auto (bf16 + compile on A100/H100), STEPS steps
#   2. the fp16 profile: hardware=t4 (16-mixed, loss scaling, fused AdamW), FP16_STEPS steps
#   3. generate.py on the main job's slm.pt
#   4. benchmarks/train_throughput.py: small at batch 64, gpt2 at batch 16, compiled
#   5. benchmarks/generate.py: prefill and decode tokens/s
#   6. strategy=ddp vs strategy=fsdp: train.py model=$BIG on every GPU, DIST_STEPS steps each
# Logs and run directories go to $GPU_CHECK_DIR (default gpu-check/). The knobs below are
# environment variables; e.g. a CPU smoke test of this script:
#   MODEL=tiny BIG=tiny HW=cpu STEPS=20 FP16_STEPS=0 TP_ARGS="--steps 5 --batch 8" \
#     GEN_ARGS="--model tiny --new-tokens 32" bash benchmarks/gpu.sh FILE
set -uo pipefail
cd "$(dirname "$0")/.."

src=${1:?usage: bash benchmarks/gpu.sh TINYSTORIES_TEXT_FILE}
[ -f "$src" ] || { echo "error: $src: no such file; pass a local TinyStories .txt" >&2; exit 2; }
src=$(realpath "$src")
out=${GPU_CHECK_DIR:-gpu-check}
MODEL=${MODEL:-small}          # the main job's model
BIG=${BIG:-gpt2}               # the second throughput shape
HW=${HW:-auto}                 # hardware group of the main job
STEPS=${STEPS:-300}
FP16_STEPS=${FP16_STEPS:-100}  # 0 skips the fp16 profile
DIST_STEPS=${DIST_STEPS:-100}  # 0 skips DDP vs FSDP
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
[ "${NGPU:-0}" -ge 1 ] || NGPU=1
TP_ARGS=${TP_ARGS:---steps 30 --repeats 1}
GEN_ARGS=${GEN_ARGS:-}
PY=${PYTHON:-python}
mkdir -p "$out"
rm -rf "$out/main" "$out/fp16" "$out/ddp" "$out/fsdp"
status=0
results=()

part() { # name log command...: run, keep the log, print PASS/FAIL
    local name=$1 log=$out/$2
    shift 2
    local t0=$SECONDS
    if "$@" >"$log" 2>&1; then
        results+=("PASS  $name ($((SECONDS - t0)) s)")
    else
        results+=("FAIL  $name ($((SECONDS - t0)) s; see $log: $(grep -m1 -E 'error|Error' "$log"))")
        status=1
    fi
    echo "${results[-1]}"
}

common=(data.source="$src" data.dir="$out/data" data.val_windows=50
        val_every_n_steps=100 optim.warmup_steps=$((STEPS / 10)) +trainer.enable_progress_bar=false)
part "main job: model=$MODEL hardware=$HW, $STEPS steps" main.log \
    $PY train.py model="$MODEL" hardware="$HW" trainer.max_steps="$STEPS" "${common[@]}" \
    hydra.run.dir="$out/main"
if [ "$FP16_STEPS" -gt 0 ]; then
    part "fp16 profile: model=$MODEL hardware=t4, $FP16_STEPS steps" fp16.log \
        $PY train.py model="$MODEL" hardware=t4 trainer.max_steps="$FP16_STEPS" "${common[@]}" \
        val_every_n_steps=50 hydra.run.dir="$out/fp16"
fi
part "generate.py on the main job's slm.pt" generate.log \
    $PY generate.py ckpt="$out/main/slm.pt" num_samples=2 max_new_tokens=100
part "train_throughput: $MODEL, batch 64, compiled" tp_main.log \
    $PY benchmarks/train_throughput.py --model "$MODEL" --batch 64 --compile $TP_ARGS
part "train_throughput: $BIG, batch 16, compiled" tp_big.log \
    $PY benchmarks/train_throughput.py --model "$BIG" --batch 16 --compile $TP_ARGS
part "benchmarks/generate.py" gen_bench.log $PY benchmarks/generate.py $GEN_ARGS
if [ "$DIST_STEPS" -gt 0 ]; then
    for strategy in ddp fsdp; do  # the same global batch: tokens/s of the two strategies
        part "strategy=$strategy: model=$BIG hardware=$HW on $NGPU GPU(s), $DIST_STEPS steps" \
            "$strategy.log" $PY train.py model="$BIG" hardware="$HW" strategy="$strategy" \
            trainer.devices="$NGPU" data.batch_size=16 trainer.max_steps="$DIST_STEPS" \
            "${common[@]}" val_every_n_steps="$DIST_STEPS" stories=0 hydra.run.dir="$out/$strategy"
    done
fi

echo
$PY - "$out" <<'EOF'
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []
for run in ("main", "fp16", "ddp", "fsdp"):
    m = out / run / "metrics.json"
    if not m.exists():
        continue
    metrics = json.loads(m.read_text())
    tps = mfu = None
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(out / run / "tb"))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        if "train/device/items_per_sec" in tags:  # items = tokens (length_fn)
            tps = acc.Scalars("train/device/items_per_sec")[-1].value
        if "train/device/mfu" in tags:
            mfu = acc.Scalars("train/device/mfu")[-1].value * 100
    except Exception as e:  # the table is a convenience: never fail the check on it
        print(f"(TensorBoard read failed: {e})")
    val = metrics["final_val_loss"]
    label = f"train.py {run} ({metrics['status']}, {metrics['steps']} steps, val {val:.3f})"
    rows.append((label, f"{tps:,.0f}" if tps else "-", mfu))
    rows.append((f"train.py {run}: whole run, validation and compile included",
                 f"{metrics['tokens_per_second'] or 0:,.0f}", None))
for name in ("tp_main", "tp_big"):
    log = out / f"{name}.log"
    text = log.read_text() if log.exists() else ""
    head = re.search(r"model=(\S+)\s+batch=(\S+)\s+precision=(\S+)", text)
    label = " ".join(head.groups()) if head else name
    for side in ("bare PyTorch loop", "Lightning Trainer"):
        tps = re.search(side + r" :\s+([\d,]+) tokens/s", text)
        kind = "bare" if side.startswith("bare") else "Lightning"
        mfu = re.search(rf"MFU {kind}: ([\d.]+)%", text)
        if tps:
            rows.append((f"{label} {kind}", tps.group(1), float(mfu.group(1)) if mfu else None))
    over = re.search(r"Lightning overhead: (\S+)", text)
    if over:
        rows.append((f"{label} Lightning overhead", over.group(1), None))
gen = (out / "gen_bench.log").read_text() if (out / "gen_bench.log").exists() else ""
for line in gen.splitlines():
    if line.startswith("batch"):
        rows.append((f"generate {line.split(':')[0]}", line.split(":", 1)[1].strip(), None))
width = max((len(r[0]) for r in rows), default=10)
print(f"{'what':<{width}}  {'tokens/s':>26}  {'MFU':>6}")
for what, tps, mfu in rows:
    print(f"{what:<{width}}  {tps:>26}  {'' if mfu is None else f'{mfu:5.1f}%':>6}")
EOF
echo
printf '%s\n' "${results[@]}"
[ $status -eq 0 ] && echo "gpu.sh: all parts passed" || echo "gpu.sh: some parts FAILED"
exit $status
