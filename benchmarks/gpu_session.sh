#!/usr/bin/env bash
# The GPU figures of benchmarks/, in one short session on a CUDA machine (an H100/H200 lent
# for ~15 minutes): the Stage-2 speed benchmark at SD 1.x sizes (reference way vs fast path,
# same run), the same on the tiny models, and the real-size generation/masking figures.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]      # default OUT_DIR: benchmarks/results
#
# A machine without our packages can be handed wheels in .whl/ (benchmarks/fetch_gpu_wheels.sh
# on a machine with PyPI, then carry .whl); they are installed into /tmp/site first. Each step has its own time limit, so a slow or
# failing step leaves the others' results.
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 \
    TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
if [ -d .whl ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$py -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" || exit 1

step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0)) s"
    tail -n 4 "$out/$name.log"
}

step 60 speed_tiny $py benchmarks/speed.py --size tiny --concepts 8 --k 8 --out "$out"
step 300 speed_real $py benchmarks/speed.py --size real --concepts 16 --reference-concepts 4 --k auto --out "$out"
step 150 masking_datagen_real $py benchmarks/masking_datagen.py --sizes real --out "$out"
