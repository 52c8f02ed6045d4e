#!/usr/bin/env bash
# The whole chain on the built-in data, on a CPU: Fashion-MNIST scenes -> pretrained small backbone
# -> AMR -> CAMs -> IR labels (dense CRF) -> IRN -> pseudo masks (random walk) -> DeepLab -> val mIoU.
# The CAM half (steps 1-5) comes first and ends with the val mIoU and the gallery; each later stage
# prints its own figure, and a table of all of them closes the run.
# Every stage skips or resumes what is done, so an interrupted demo picks up where it stopped.
set -euo pipefail
PY=${PYTHON:-python3}
OUT=${1:-demo}
PRESET=${PRESET:-amr-block}  # PRESET=amr make demo: the source document's placement (see README)
mkdir -p "$OUT"
amrseg() { "$PY" -m amrseg "$@"; }
T0=$(date +%s)
stamp() { echo "   ($(( $(date +%s) - T0 )) s so far)"; }
# say FILE.json FORMAT: prints FORMAT with {miou}, {threshold}, ... of the JSON, fractions as percent.
say() {
    "$PY" -c 'import json, sys
m = json.load(open(sys.argv[1]))
print("   " + sys.argv[2].format(**{k: 100 * v if isinstance(v, float) and k != "threshold" else v for k, v in m.items()}))' "$@"
}
# train-* commands: start, resume an interrupted run, or skip a finished one.
train() {
    local cmd=$1 out=$2; shift 2
    if [ -f "$out/model.pt" ]; then return; fi
    if [ -f "$out/checkpoint.pt" ]; then amrseg "$cmd" --out "$out" "$@" --resume >/dev/null
    else amrseg "$cmd" --out "$out" "$@" >/dev/null; fi
}
cams() {  # cams SPLIT: the split's CAMs (with the branch maps, for eval-cam --xi-sweep) and their mIoU
    amrseg make-cam --run "$OUT/$PRESET" --data "$S" --split "$1" --out "$OUT/cams-$1" --scales 1.0,0.5,1.5 \
        --save-branches >/dev/null
    amrseg eval-cam --cams "$OUT/cams-$1" --data "$S" --split "$1" --sweep 0.05:0.60:0.05 \
        --out "$OUT/cam-$1.json" >/dev/null
}
S="$OUT/scenes"
NET=(--backbone resnet18 --base-width 32 --crop 128 --batch-size 16)

echo "== 1/11 Fashion-MNIST scenes in $S"
[ -f "$S/ImageSets/Segmentation/val.txt" ] || amrseg build-fashion-scenes "$S" --train 3000 --val 300 >/dev/null
echo "== 2/11 pretraining a small backbone (the CPU stand-in for ImageNet)"
[ -f "$OUT/backbone.pt" ] || amrseg pretrain-backbone --out "$OUT/backbone.pt" --backbone resnet18 --base-width 32 \
    --epochs 1 --items 16000 --size 96 > "$OUT/backbone.json"
[ -f "$OUT/backbone.json" ] && say "$OUT/backbone.json" "accuracy on single cluttered items: {test_accuracy:.1f}%"
stamp
echo "== 3/11 training $PRESET"
train train-cam "$OUT/$PRESET" --data "$S" --split train --preset "$PRESET" --epochs 3 --lr 0.05 \
    --pretrained "$OUT/backbone.pt" "${NET[@]}"
stamp
echo "== 4/11 CAMs of val"
cams val
say "$OUT/cam-val.json" "CAM mIoU on val: {miou:.1f} at threshold {threshold:.2f}"
stamp
echo "== 5/11 CAM gallery"
amrseg visualize --cams "$OUT/cams-val" --data "$S" --split val --out "$OUT/gallery" --limit 40 \
    --metrics "$OUT/cam-val.json" >/dev/null
echo "   gallery: $OUT/gallery/index.html"
stamp
echo "== 6/11 CAMs of train (the input of the pseudo masks)"
cams train
say "$OUT/cam-train.json" "CAM mIoU on train: {miou:.1f} at threshold {threshold:.2f}"
stamp
echo "== 7/11 IR labels: dense CRF at the high and low thresholds"
amrseg pseudo-labels --cams "$OUT/cams-train" --data "$S" --split train --out "$OUT/ir-labels" --method crf \
    > "$OUT/ir-labels.json"
say "$OUT/ir-labels.json" "IR labels: {confident_fraction:.1f}% of the pixels confident, {confident_precision:.1f}% of those right"
stamp
echo "== 8/11 training IRN on the IR labels"
train train-irn "$OUT/irn" --cams "$OUT/cams-train" --ir-labels "$OUT/ir-labels" --data "$S" --split train \
    --pretrained "$OUT/$PRESET" --epochs 3 "${NET[@]}"
stamp
echo "== 9/11 pseudo masks: random walk on the IRN boundaries"
amrseg pseudo-labels --cams "$OUT/cams-train" --data "$S" --split train --out "$OUT/pseudo-masks" --method irn \
    --irn "$OUT/irn" > "$OUT/pseudo-masks.json"
say "$OUT/pseudo-masks.json" "pseudo-mask mIoU on train: {miou:.1f}"
stamp
echo "== 10/11 training DeepLab-v2 on the pseudo masks"
train train-seg "$OUT/seg" --data "$S" --labels "$OUT/pseudo-masks" --split train --epochs 4 --lr 0.01 \
    --set train.new_lr_mult=2 --pretrained "$OUT/$PRESET" "${NET[@]}"
stamp
echo "== 11/11 segmentation of val"
amrseg eval-seg --run "$OUT/seg" --data "$S" --split val --scales 1.0,0.5,1.5 --save "$OUT/seg-val" \
    --out "$OUT/seg-val.json" >/dev/null
say "$OUT/seg-val.json" "DeepLab-v2 mIoU on val: {miou:.1f}"
stamp
"$PY" - "$OUT" "$PRESET" <<'PYEOF'
import json, sys
out, preset = sys.argv[1:]
r = lambda name: json.load(open(f"{out}/{name}"))
cam_t, cam_v, ir, pm, seg = r("cam-train.json"), r("cam-val.json"), r("ir-labels.json"), r("pseudo-masks.json"), r("seg-val.json")
pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
print(f"\n| stage | split | mIoU |\n|---|---|---|")
print(f"| {preset} CAM (threshold {cam_t['threshold']:.2f}) | train | {pct(cam_t['miou'])} |")
print(f"| {preset} CAM (threshold {cam_v['threshold']:.2f}) | val | {pct(cam_v['miou'])} |")
print(f"| IR labels (precision of the {pct(ir['confident_fraction'])}% confident pixels) | train | {pct(ir['confident_precision'])} |")
print(f"| pseudo masks (IRN random walk) | train | {pct(pm['miou'])} |")
print(f"| DeepLab-v2 on the pseudo masks | val | {pct(seg['miou'])} |")
print(f"\nCAM gallery: {out}/gallery/index.html; segmentation masks of val: {out}/seg-val/")
PYEOF
