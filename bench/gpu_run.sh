#!/usr/bin/env bash
# The GPU figures of the README (issue 12). Prepare first with bench/prepare_gpu.sh, then, through the
# device tool (at most 600 s a call, so two calls, back to back while the machine is warm):
#   run(command="bash bench/gpu_run.sh extract train-b16", carry=[".gpu"])
#   run(command="bash bench/gpu_run.sh train-l14 pack", carry=[".gpu"])
# No arguments runs every part. JSON and logs go to $OUT. Each benchmark is a ratio against a
# baseline measured in the same run; each part stops at its own time limit.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(extract train-b16 train-l14 pack)
python3 -m pip install -q --no-index --no-deps .gpu/wheels/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/gpu.txt"
python3 -c "import embedcache, embedcache.students, zarr, faiss, open_clip, httpx; print('imports ok')" || exit 1
run() { local limit=$1; shift; echo "== $*"; timeout "$limit" python3 "$@" --out "$OUT" 2>&1 | grep -v WARNING | tee -a "$OUT/gpu.log"; }
for part in "${parts[@]}"; do
    case $part in
    extract) run 260 bench/extract.py --model ViT-B-16 --precision bf16 --views 1 4 --decoders pil device --baseline \
        --workers 15 --batch 256 --jpegs 4000 --pacs .gpu/pacs --read-rows 1000000 ;;
    train-b16) run 240 bench/train.py --student resnet18 --size 224 --batch 128 --canvas 256 --teacher ViT-B-16 --steps 60 \
        --images 2048 --head-steps 2000 --heads 32 ;;
    # ViT-L-14 for the online arm's 10x target; one round of head arms (train-b16 measures them over three)
    train-l14) run 200 bench/train.py --student resnet18 --size 224 --batch 128 --canvas 256 --teacher ViT-L-14 --steps 40 \
        --images 1024 --head-steps 500 --heads 8 --rounds 1 ;;
    # VL2V-ADiP's runs (224 px, batch 96) one at a time, then 2 and 4 sharing the GPU; projected to 5,000 steps
    pack) run 240 bench/pack.py --workers 2 4 --steps 150 --size 224 --batch 96 --canvas 256 --images 1024 ;;
    *) echo "unknown part $part (extract, train-b16, train-l14, pack)"; exit 2 ;;
    esac
done
