#!/usr/bin/env bash
# Prepares, on this machine, what scripts/gpu_check.sh needs on a bare CUDA machine that cannot reach a
# package registry: the wheels of the Python packages its image lacks, and the SmolLM2 tokenizer (the
# embedded model's GGUF file, 94 MB, is too large to travel: the GPU check uses random-weight models).
#
#   bash scripts/gpu_wheels.sh            # fills scripts/gpu-carry/ (git-ignored through .git/info/exclude)
#
# Then run the check with the device tool, carrying that folder:
#   run(command="bash scripts/gpu_check.sh", carry=["scripts/gpu-carry"], timeout_s=600)
#
# The GPU machine's image (see the device tool's KINDS.md) has Python 3.12, torch 2.11, transformers,
# accelerate, peft, pyarrow, pandas, fsspec, xxhash, aiohttp, pytest and triton, but not datasets (which
# smolalign imports), its dill and multiprocess, trl or liger-kernel. Everything is fetched with
# --no-deps for CPython 3.12 on x86-64 Linux; the versions are those smolalign is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=scripts/gpu-carry
PYTHON=${PYTHON:-.venv/bin/python}
PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}
LIMIT_MIB=64  # what the device tool carries per call, the working tree included
WHEELS=(
    trl==1.16.0
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    liger-kernel==0.8.5
)

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx "/$CARRY/" "$exclude" 2>/dev/null || echo "/$CARRY/" >>"$exclude"

rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$CARRY/cache"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$CARRY/wheels" "${WHEELS[@]}"

# The tokenizer, converted from the embedded GGUF file once (it is in this machine's cache already
# when smolalign has run here); gpu_check.sh points SMOLALIGN_CACHE at a copy of it.
tokenizer=$("$PYTHON" -c "from smolalign.models.embedded import embedded_tokenizer_dir; print(embedded_tokenizer_dir())")
cp -r "$tokenizer" "$CARRY/cache/"

echo "requirements the wheels declare (all but these are on the GPU machine's image):"
for wheel in "$CARRY"/wheels/*.whl; do
    unzip -p "$wheel" '*.dist-info/METADATA' | { grep '^Requires-Dist' || true; } | { grep -v 'extra ==' || true; } |
        sed "s|^|  $(basename "$wheel"): |"
done
carried_kib=$(du -sk "$CARRY" | cut -f1)
tree_kib=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
total_mib=$(((carried_kib + tree_kib) / 1024))
echo "carried: $((carried_kib / 1024)) MiB in $CARRY; with the tracked tree: ${total_mib} MiB (limit ${LIMIT_MIB} MiB)"
if ((total_mib >= LIMIT_MIB)); then
    echo "too large for the device tool" >&2
    exit 1
fi
