#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored) for a device run of bench/gpu_run.sh: the GPU host has Python 3.12 with
# torch, torchvision, timm, h5py, pandas, click, httpx and threadpoolctl (/work/.library/device/KINDS.md),
# no package index, and no ../shared. This copies the offline wheels the host lacks, downloads
# setuptools >= 77 (pyproject's SPDX licence needs it for the editable install; the host's version is
# not known) and fastcrc (a dependency the host's wheels lack), and copies a few hundred PACS photos
# to make JPEGs from. Then the two device calls at the head of bench/gpu_run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}  # the project's shared folder (a checkout elsewhere: SHARED=/work/shared)
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/pacs/photo
cp "$SHARED"/gpu-host/wheels-py312/*.whl .gpu/wheels/
.venv/bin/python -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any -d .gpu/wheels 'setuptools>=77' 'fastcrc>=0.5'
for cls in "$SHARED"/datasets/pacs/photo/*/; do
    name=$(basename "$cls"); mkdir -p ".gpu/pacs/photo/$name"
    ls "$cls" | head -45 | while read -r f; do cp "$cls/$f" ".gpu/pacs/photo/$name/"; done
done
du -sh .gpu
