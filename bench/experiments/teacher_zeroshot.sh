#!/usr/bin/env bash
# The README's per-classifier zero-shot table: the conse teacher on one PACS subset (50 images per domain
# and class); then python bench/experiments/teacher_table.py
cd "$(dirname "$0")/../.."
EC=.venv/bin/embedcache
export OMP_NUM_THREADS=1
for m in lite0 lite1 lite2; do
  $EC extract --config pacs-conse --out stores/pacs-conse-$m-zs50.zarr --set teacher.model=efficientnet-$m \
      --set views.count=1 --set canvas.store=false --set dataset.max_per_class=50 --set num_workers=0 --no-progress
  $EC evaluate --store stores/pacs-conse-$m-zs50.zarr --out stores/zs50-$m.parquet
done
echo ZS DONE
