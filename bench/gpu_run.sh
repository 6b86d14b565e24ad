#!/usr/bin/env bash
# The GPU figures of the README (issue 12). Prepare first with bench/prepare_gpu.sh. A session is lent
# 15 minutes of device time in all, machine start included (a few minutes), so the parts are sized to
# about 9 to 10 minutes together, in two calls back to back while the machine is warm, the figures the
# issue's targets name first:
#   run(command="bash bench/gpu_run.sh extract train-b16", carry=[".gpu"], timeout_s=340)
#   run(command="bash bench/gpu_run.sh checks pack train-l14", carry=[".gpu"], timeout_s=320)
# (checks first in the second call: its decoder-stream check is the one that can find wrong numbers.)
# No arguments runs every part in that order. JSON and logs go to $OUT. Each benchmark is a ratio
# against a baseline measured in the same run and prints each figure as soon as it has it; each part
# stops at its own time limit, so a slow part costs only its own figures.
set -uo pipefail
export PYTHONUNBUFFERED=1  # a part stopped by its limit still shows what it printed
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(extract train-b16 checks pack train-l14)
# setuptools >= 77 (pyproject's SPDX licence) comes with the wheels: the editable install needs it. A machine
# still warm from the first call has them: not installed twice
if ! python3 -m pip show -q embedcache > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps .gpu/wheels/*.whl 2>&1 | tail -5
    python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -5
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/gpu.txt"
df -h /dev/shm | tee -a "$OUT/gpu.txt"  # DataLoader workers pass batches through it
python3 -c "import embedcache, embedcache.students, zarr, faiss, open_clip, httpx; print('imports ok')" || exit 1
# the host's own torch stack (open_clip 3.3 wants timm >= 1.0.17, which --no-deps does not check)
python3 -c "import torch, torchvision, timm, open_clip; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'open_clip', open_clip.__version__)" | tee -a "$OUT/gpu.txt"
run() { local limit=$1; shift; echo "== $*"; timeout --kill-after=10 "$limit" python3 "$@" --out "$OUT" 2>&1 | grep --line-buffered -v WARNING | tee -a "$OUT/gpu.log"; }
for part in "${parts[@]}"; do
    case $part in
    extract) run 150 bench/extract.py --model ViT-B-16 --precision bf16 --views 1 4 --decoders pil device --baseline \
        --workers 15 --batch 256 --jpegs 3000 --pacs .gpu/pacs --read-rows 50000 ;;
    train-b16) run 140 bench/train.py --student resnet18 --size 224 --batch 128 --canvas 256 --teacher ViT-B-16 --steps 60 \
        --images 2048 --head-steps 1000 --heads 32 ;;
    # ViT-L-14 for the online arm's 10x target; one round of head arms (train-b16 measures them over three)
    train-l14) run 90 bench/train.py --student resnet18 --size 224 --batch 128 --canvas 256 --teacher ViT-L-14 --steps 30 \
        --images 512 --head-steps 300 --heads 8 --rounds 1 ;;
    # VL2V-ADiP's runs (224 px, batch 96) one at a time, then 2 and 4 sharing the GPU; projected to 5,000 steps
    pack) run 130 bench/pack.py --workers 2 4 --steps 100 --size 224 --batch 96 --canvas 256 --images 1024 ;;
    # device vs PIL canvases for each kind of JPEG, and the synchronising calls per batch and per step
    checks) run 75 bench/gpu_checks.py --pacs .gpu/pacs ;;
    *) echo "unknown part $part (extract, train-b16, pack, train-l14, checks)"; exit 2 ;;
    esac
done
