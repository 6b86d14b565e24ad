#!/usr/bin/env bash
# The README's data-free experiment (Results), stage by stage; each stage resumes or skips what is done:
#   bash bench/experiments/datafree.sh eval|synth|photo|students|score   then   python bench/experiments/datafree_table.py
# PACS from ../shared/datasets/pacs (PACS=... to change).
set -euo pipefail
cd "$(dirname "$0")/../.."
PACS=${PACS:-../shared/datasets/pacs}
EC=.venv/bin/embedcache
D=stores/datafree
R=runs/datafree
case "$1" in
eval)   # real PACS evaluation store: first 30 images of every (domain, class), view 0 only; the teacher's row
  $EC extract --config pacs-conse --set dataset.path=$PACS --out $D/pacs-eval.zarr --set dataset.max_per_class=30 --set views.count=1 \
      --set canvas.size=224 --set text.sources=[name,templates] --set text.templates=short7 --no-progress
  $EC evaluate --store $D/pacs-eval.zarr --source name --out $D/results-teacher.parquet ;;
synth)  # one store of synthesised images per diversification method
  for m in ${METHODS:-plain contrastive mix random}; do
    $EC synthesize --config configs/synthesize/pacs-$m.yaml --out $D/pacs-$m.zarr --no-progress
  done ;;
photo)  # real photos, as many as each synthesised store has (8 per class, none of them in the evaluation store)
  mkdir -p $D
  python3 -c "import os, sys; r = os.path.abspath(sys.argv[1]) + '/photo'; print('path,label,domain,split')
for c in sorted(os.listdir(r)):
    for f in sorted(os.listdir(os.path.join(r, c)))[30:38]: print(f'{r}/{c}/{f},{c},photo,train')" "$PACS" > $D/photo8.csv
  $EC extract --config pacs-conse --out $D/pacs-photo.zarr --set dataset.name=csv --set dataset.path=$D/photo8.csv \
      --set views.count=4 --set canvas.size=64 --set text.sources=[name,templates] --set text.templates=short7 --no-progress ;;
students)  # the same student and recipe on every store, 3 seeds: an ImageNet EfficientNet-Lite0 backbone (frozen,
  # 64 px) whose cached features a projection head learns to map onto the teacher (VL2V-ADiP's align step)
  for s in ${STORES:-plain contrastive mix random photo}; do
    $EC features --store $D/pacs-$s.zarr --student efficientnet_lite0 --set input_size=64 --no-progress
    for seed in 0 1 2; do
      $EC train --store $D/pacs-$s.zarr --recipe vl2v_adip_align --student efficientnet_lite0 --out $R/$s-$seed \
          --set student.input_size=64 --set features=true --set steps=300 --set batch_size=32 --set optim.lr=1e-3 \
          --set split.val_fraction=0 --set eval_every=100 --set ckpt_every=100 --set seed=$seed --no-progress
    done
  done ;;
score)  # every run scored on the real evaluation store: every domain a test domain
  for s in ${STORES:-plain contrastive mix random photo}; do
    $EC evaluate $R/$s-0 $R/$s-1 $R/$s-2 --store $D/pacs-eval.zarr --transfer --out $D/results-$s.parquet
  done ;;
esac
