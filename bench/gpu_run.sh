#!/usr/bin/env bash
# One device run for the GPU figures of the README (issue 12). Prepare first with bench/prepare_gpu.sh,
# then, through the device tool: run(command="bash bench/gpu_run.sh", carry=[".gpu"]). JSON and logs go
# to $OUT. Each benchmark is a ratio against a baseline measured in the same run.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps .gpu/wheels/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import embedcache, embedcache.students, zarr, faiss, open_clip, httpx; print('imports ok')" || exit 1
run() { echo "== $*"; timeout 240 python3 "$@" --out "$OUT" 2>&1 | grep -v WARNING | tee -a "$OUT/gpu.log"; }
run bench/extract.py --model ViT-B-16 --precision bf16 --views 1 4 --decoders pil device --baseline \
    --workers 15 --batch 256 --jpegs 4000 --pacs .gpu/pacs --read-rows 1000000
run bench/train.py --student resnet18 --size 224 --batch 128 --canvas 256 --teacher ViT-B-16 --steps 60 \
    --images 2048 --head-steps 2000 --heads 32
run bench/train.py --student resnet18 --size 224 --batch 128 --canvas 256 --teacher ViT-L-14 --steps 40 \
    --images 1024 --head-steps 500 --heads 8 --rounds 1
