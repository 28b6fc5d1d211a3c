#!/usr/bin/env bash
# The default recipe on one GPU in under 8 minutes: tokens/s, MFU and peak memory of a training step at GPT-2
# 124M (bench.py, random tokens), then the default command for a fixed number of steps with validation at fixed
# steps (train_gpt2.py, FineWeb), and one summary. Everything it measures lands under $OUT (default
# runs/gpu_check): bench.json, the run's metrics.jsonl, and summary.json.
#
#   bash gpu_check.sh                              FineWeb from the Hub, into the usual --data_cache
#   DATA_CACHE=/path bash gpu_check.sh             a cache another machine filled (no Hub needed)
#   STEPS=200 EVERY=50 bash gpu_check.sh           fewer steps (default 1000, validation every 250)
set -euo pipefail
cd "$(dirname "$0")"
out=${OUT:-runs/gpu_check}
steps=${STEPS:-1000}
every=${EVERY:-250}
device=${DEVICE:-cuda}
mkdir -p "$out"
data=()
if [[ -n "${DATA_CACHE:-}" ]]; then data=(--data_cache "$DATA_CACHE"); fi

python bench.py --device "$device" --steps "${BENCH_STEPS:-20}" --warmup "${BENCH_WARMUP:-5}" \
  ${BENCH_FLAGS:-} --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
rm -rf "$out/run"
python train_gpt2.py --device "$device" --max_steps "$steps" --eval_interval "$every" --log_interval 10 \
  --save_dir "$out/run" "${data[@]}" ${TRAIN_FLAGS:-} 2>&1 | tee "$out/train.log"
python - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
steps = [r for r in rows if "tokens_per_s" in r][1:]  # the first logged step holds the compilation
done = next(r for r in rows if r.get("event") in ("done", "stopped", "failed"))
summary = {
    "bench": json.loads((out / "bench.json").read_text()).get("train"),
    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps) if steps else None,
    "mfu": statistics.median(r["mfu"] for r in steps if "mfu" in r) if any("mfu" in r for r in steps) else None,
    "validation": {r["step"]: r["val_loss"] for r in rows if "val_loss" in r},
    "seconds": done["seconds"], "peak_memory_gib": done.get("peak_memory_gib"),
}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: v for k, v in summary.items() if k != "bench"}, indent=2))
PY
