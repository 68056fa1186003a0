#!/usr/bin/env bash
# Remake the built-in model in assets/synthetic/ from nothing but this repository, on a CPU:
#   1. the CLIP: scripts/train_synthetic_clip.py on 20,000 generated scenes of seed 1;
#   2. the WeCLIP decoder: rfm train (the project's trainer and recipe) on generated scenes of seed 3;
#   3. the gallery's sample scenes (seed 2, indices from 100000: never used for training or the benchmark).
# Every stage resumes when rerun after an interruption. Work goes to runs/; results are copied to assets/synthetic/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DECODER_STEPS=${DECODER_STEPS:-1500}
TRAIN_SCENES=${TRAIN_SCENES:-400}
export PYTHONWARNINGS=ignore::FutureWarning

resume() { [ -f "$1/state.pt" ] && echo --resume || true; }

$PY scripts/train_synthetic_clip.py --out runs/synthetic-clip $(resume runs/synthetic-clip)

$PY -m rfm synth --out runs/synthetic-train --num "$TRAIN_SCENES" --seed 3 --split train
$PY -m rfm train --voc runs/synthetic-train --split runs/synthetic-train/ImageSets/Segmentation/train.txt \
    --vocab synthetic --clip runs/synthetic-clip/clip.pt --out runs/synthetic-decoder --steps "$DECODER_STEPS" \
    --save-every 100 --device cpu $(resume runs/synthetic-decoder)

mkdir -p assets/synthetic
cp runs/synthetic-clip/clip.pt assets/synthetic/clip.pt
cp runs/synthetic-decoder/decoder.safetensors runs/synthetic-decoder/decoder.json assets/synthetic/
rm -rf assets/synthetic/samples
$PY -m rfm synth --out assets/synthetic/samples --num 6 --seed 2 --start 100000 --split samples
(cd assets/synthetic && sha256sum clip.pt decoder.safetensors decoder.json)
