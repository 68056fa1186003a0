#!/usr/bin/env bash
# The checks that need a GPU, as one run of at most ~8 minutes on a lent machine (device tool):
#   bash scripts/gpu_check.sh            (from the repository root; builds .venv if missing)
# 1. the CUDA tests (no skips allowed on a GPU machine)   2. the pipeline benchmark on cuda
# 3. the export benchmark on cuda   4. a 2-GPU torchrun export when two GPUs exist
# 5. fp16 autocast of the backbone against fp32 (max CAM difference)
# Prints one summary at the end; exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || make .venv/.installed >/dev/null
OUT=${OUT:-$(mktemp -d)}
summary=()
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name"
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then summary+=("PASS  $name"); else summary+=("FAIL  $name (rc $?, see $OUT/$name.log)"); fi
  tail -n 25 "$OUT/$name.log"
}

gpus=$($PY -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $gpus; $($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")')"
[ "$gpus" -ge 1 ] || { echo "no CUDA device: nothing to check"; exit 1; }

# -rs lists skips; on a GPU machine a CUDA test may not skip
step cuda-tests 240 $PY -m pytest -q -rs -k "cuda or CUDA" tests/
if grep -q "SKIPPED" "$OUT/cuda-tests.log"; then summary+=("FAIL  cuda-tests skipped something on a GPU machine"); fi
step bench-pipeline 150 $PY benchmarks/bench_pipeline.py --device cuda --repeats 5
step bench-export 150 $PY benchmarks/bench_export.py
if [ "$gpus" -ge 2 ]; then
  step torchrun-2gpu 120 bash -c "
    $PY -m rfm synth --out $OUT/scenes --num 16 --seed 2 >/dev/null &&
    .venv/bin/torchrun --nproc_per_node 2 -m rfm export --voc $OUT/scenes --clip synthetic --out $OUT/pl2 --format png,coco &&
    $PY -m rfm export --voc $OUT/scenes --clip synthetic --out $OUT/pl1 --format png,coco --device cuda &&
    $PY -c \"import json; a=json.load(open('$OUT/pl2/summary.json')); b=json.load(open('$OUT/pl1/summary.json')); print(a, b); assert a['done'] + a['skipped'] == b['done'] == 16\" &&
    diff -r $OUT/pl1/SegmentationClass $OUT/pl2/SegmentationClass && echo 'labels of 2 ranks == 1 rank'"
fi
step fp16-autocast 60 $PY - <<'PY'
import numpy as np, torch, rfm
from rfm.data import load_image
clip = rfm.load_clip(pretrained="synthetic", device="cuda")
decoder = rfm.load_decoder("synthetic")
predictor = rfm.Predictor(clip, vocabulary="synthetic", decoder=decoder)
image = load_image(sorted((rfm.paths.SYNTHETIC_DIR / "samples" / "JPEGImages").glob("*.jpg"))[0])
predictor.set_image(image, labels=[0, 1])
ref = predictor.refine()
with torch.autocast("cuda", dtype=torch.float16):
    predictor.set_image(image, labels=[0, 1])
half = predictor.refine()
for stage in ("initial", "static", "rfm"):
    print(f"fp16 autocast vs fp32, {stage}: max |ΔCAM| = {np.abs(ref.cam(stage) - half.cam(stage)).max():.2e}")
print(f"pseudo label agreement: {100 * (ref.label == half.label).mean():.2f} %")
PY

echo; echo "=== summary (logs in $OUT)"
printf '%s\n' "${summary[@]}"
! printf '%s\n' "${summary[@]}" | grep -q '^FAIL'
