#!/usr/bin/env bash
# The GPU checks of the cluster issue, on one GPU, in one go (about 6-9 minutes on an H100/H200 after
# `make install`): the smoke config with bf16-mixed (also on small JPEGs decoded in the workers and on
# the GPU), then configs/m5product_features.yaml (the
# official model on pre-extracted features) for a few steps under DDP, FSDP and DeepSpeed ZeRO-2.
# Prints one table: samples/s (steady state, after 5 warm-up steps) and peak GPU memory of each.
#
#   bash bench/gpu_check.sh            # results also in outputs/gpu_check/report.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
SCALE=.venv/bin/scale
export PYTHONPATH=$PWD
make --no-print-directory install
rm -rf "$OUT" && mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

# Demo products with media (smoke) and with features (the features config), sharded.
$SCALE demo-data --out "$OUT/raw" --products 400 --seed 0 --features --workers 8 > /dev/null
$SCALE shards --src "$OUT/raw" --out "$OUT/shards" --max-count 100 > /dev/null

run() {  # label, then scale fit arguments (SHARDS: other shards than the demo's)
    local label=$1; shift
    echo "== $label"
    $SCALE fit "$@" --data.train_shards "${SHARDS:-$OUT/shards}" --trainer.default_root_dir "$OUT/$label" \
        --trainer.logger.init_args.save_dir "$OUT/$label" --trainer.enable_progress_bar false --trainer.devices 1 \
        --trainer.callbacks+=bench.gpu_report.GPUReport --trainer.callbacks.label "$label" \
        2>&1 | tee "$OUT/$label.log" | grep -E "GPU_REPORT|rror|Exception" || true
}

run smoke_bf16 --config configs/smoke.yaml --trainer.precision bf16-mixed --trainer.max_steps 60 \
    --data.val_shards null --data.num_workers 8
# The small JPEGs (images at the smoke's image.size, its frames as strips) decoded in the workers,
# then as bitstreams on the GPU (nvJPEG, `decode_on: device`): samples/s side by side.
$SCALE shards --src "$OUT/raw" --out "$OUT/small_shards" --max-count 100 --shrink-images 64 --extract-frames 4x32 > /dev/null
for where in workers device; do
    SHARDS="$OUT/small_shards" run "smoke_small_jpegs_on_$where" --config configs/smoke.yaml --trainer.precision bf16-mixed --trainer.max_steps 60 \
        --data.val_shards null --data.num_workers 8 --model.config.image.decode_on "$where" --model.config.video.decode_on "$where"
done
# nvJPEG against the CPU's decoder, its time per batch of 64, and the stream hazard of
# pytorch/vision#9606, at the smoke's sizes and at base.yaml's (224-px images, 12 frames of 112).
$SCALE demo-data --out "$OUT/raw_base" --products 64 --seed 1 --image-size 320 --video-size 160 --video-seconds 4 \
    --workers 8 > /dev/null
$SCALE shards --src "$OUT/raw_base" --out "$OUT/base_shards" --shrink-images 224 --extract-frames 12x112 > /dev/null
{ .venv/bin/python bench/gpu_decode_check.py --shards "$OUT/small_shards" --image-size 64 --frames 4 --frame-size 32
  .venv/bin/python bench/gpu_decode_check.py --shards "$OUT/base_shards" --image-size 224 --frames 12 --frame-size 112
} 2>&1 | tee "$OUT/gpu_decode.log" | grep -E "GPU_DECODE|rror" || true
for strategy in ddp fsdp deepspeed_zero2; do
    run "features_$strategy" --config configs/m5product_features.yaml --config "configs/strategy/$strategy.yaml" \
        --trainer.max_steps 25 --data.batch_size 32 --data.num_workers 8 --data.shuffle_buffer 200 \
        --model.config.tokenizer minilm --data.val_shards null
    # The checkpoint each strategy wrote (a file, an FSDP sharded folder, a ZeRO folder) exports.
    $SCALE export --ckpt "$OUT/features_$strategy/checkpoints/last.ckpt" --out "$OUT/export_$strategy" 2>&1 \
        | tee -a "$OUT/features_$strategy.log" | grep -E "^exported|rror" || true
done

{ grep -h GPU_REPORT "$OUT"/*.log || true; } | sed 's/^GPU_REPORT //' > "$OUT/report.jsonl"
.venv/bin/python - "$OUT/report.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
expected = ["smoke_bf16", "smoke_small_jpegs_on_workers", "smoke_small_jpegs_on_device", "features_ddp", "features_fsdp", "features_deepspeed_zero2"]
missing = [label for label in expected if label not in {r["label"] for r in rows}]
print(f"{'run':<24}{'strategy':<24}{'precision':<12}{'samples/s':>10}{'peak GiB':>10}")
for r in rows:
    print(f"{r['label']:<24}{r['strategy']:<24}{r['precision']:<12}{r['samples_per_s']:>10.1f}{r['peak_gib']:>10.2f}")
for label in missing:
    print(f"{label:<24}FAILED: see its log in the output folder")
sys.exit(1 if missing else 0)
PY
