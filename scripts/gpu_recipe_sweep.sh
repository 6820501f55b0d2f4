#!/usr/bin/env bash
# Train several base-VLM recipes side by side on one lent GPU (issue 13's search), each with
# scripts/train_base_vlm_device.py, and pack what each left (checkpoint, history, knob curves, log)
# into $OUT/<name>.tar.gz. Usage: scripts/gpu_recipe_sweep.sh DEADLINE_S CURVE_SAMPLES "name|--set a=1 --set b=2" ...
set -u
deadline=$1; curves=$2; shift 2
out=${OUT:-outputs/sweep}; mkdir -p "$out" outputs/sweep
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader || true
pids=()
for spec in "$@"; do
  name=${spec%%|*}; sets=${spec#*|}
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 python3 scripts/train_base_vlm_device.py --device cuda \
    --checkpoint-dir outputs/sweep/$name/ck --output-dir outputs/sweep/$name/model \
    --deadline-s "$deadline" --curve-samples "$curves" --set cache_crops=true --set num_threads=2 $sets \
    > outputs/sweep/$name.log 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for spec in "$@"; do
  name=${spec%%|*}
  grep -v -E "it/s|s/it|Warning|warn" outputs/sweep/$name.log | tail -n 12 | sed "s/^/[$name] /"
  tar -czf "$out/$name.tar.gz" -C outputs/sweep "$name.log" "$name/model"
done
