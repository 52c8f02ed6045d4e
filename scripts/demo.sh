#!/usr/bin/env bash
# The main job on the built-in data, on a CPU in a few minutes: Fashion-MNIST scenes ->
# pretrained small backbone -> AMR training -> CAMs -> mIoU -> gallery.
set -euo pipefail
PY=${PYTHON:-python3}
OUT=${1:-demo}
mkdir -p "$OUT"
amrseg() { "$PY" -m amrseg "$@"; }

echo "== 1/6 building Fashion-MNIST scenes in $OUT/scenes"
[ -f "$OUT/scenes/ImageSets/Segmentation/val.txt" ] || amrseg build-fashion-scenes "$OUT/scenes" --train 3000 --val 300
echo "== 2/6 pretraining a small backbone (the CPU stand-in for ImageNet)"
[ -f "$OUT/backbone.pt" ] || amrseg pretrain-backbone --out "$OUT/backbone.pt" --backbone resnet18 --base-width 32 \
    --epochs 1 --items 16000 --size 96
SMALL=(--backbone resnet18 --base-width 32 --pretrained "$OUT/backbone.pt" --crop 128 --batch-size 16 --lr 0.05)
echo "== 3/6 training AMR"
if [ -f "$OUT/amr/model.pt" ]; then :
elif [ -f "$OUT/amr/checkpoint.pt" ]; then
    amrseg train-cam --data "$OUT/scenes" --split train --preset amr --out "$OUT/amr" --epochs 3 "${SMALL[@]}" --resume
else
    amrseg train-cam --data "$OUT/scenes" --split train --preset amr --out "$OUT/amr" --epochs 3 "${SMALL[@]}"
fi
echo "== 4/6 CAMs of the val split"
amrseg make-cam --run "$OUT/amr" --data "$OUT/scenes" --split val --out "$OUT/cams" --scales 1.0,0.5,1.5 --save-branches
echo "== 5/6 scoring"
amrseg eval-cam --cams "$OUT/cams" --data "$OUT/scenes" --split val --sweep 0.05:0.60:0.05 --out "$OUT/metrics.json" >/dev/null
echo "== 6/6 gallery"
amrseg visualize --cams "$OUT/cams" --data "$OUT/scenes" --split val --out "$OUT/gallery" --limit 40 --metrics "$OUT/metrics.json" >/dev/null
"$PY" - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
m = json.load(open(f"{out}/metrics.json"))
print(f"\nAMR CAMs on {m['num_images']} val scenes: mIoU {100 * m['miou']:.1f} at background threshold {m['threshold']:.2f}")
print(f"gallery: {out}/gallery/index.html")
PYEOF
