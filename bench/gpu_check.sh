#!/usr/bin/env bash
# Everything of issue #26 that needs a GPU, in one device call that ends within 8 minutes; results under $OUT.
#
# 1. Here (a machine with PyPI), once:  bash bench/gpu_check.sh prepare
#    downloads the wheels the device lacks into .whl/ and copies the default model's tokenizer into .gpu/ (both
#    git-ignored through .git/info/exclude), for Python 3.12 as the device has it.
# 2. On the device:  run(command="bash bench/gpu_check.sh", carry=[".whl", ".gpu"], timeout_s=540)
#
# Steps, each under its own time limit, each logged to $OUT/<step>.log, a failed one recorded in $OUT/summary.txt
# without stopping the next: the environment; the `cuda` tests (Triton kernels and the whole forward on CUDA against
# the torch path and PEFT); the benchmark (bench/bench_gpu.py, figures in $OUT/bench.json as they come).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(pydantic==2.14.3 pydantic_core==2.50.4 pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0
        typing-inspection==0.4.5 typing_extensions==4.16.0 llguidance==1.9.1 gguf==0.19.0 pytest-asyncio==1.5.0)

prepare() {
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    local platforms=()
    for tag in manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
               manylinux2014_x86_64; do
        platforms+=(--platform "$tag")
    done
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${WHEELS[@]}"
    local tokenizer
    tokenizer=$(.venv/bin/python -c 'from server.model.default_model import default_model_dir; print(default_model_dir())')
    local target=.gpu/cache/models/$(basename "$tokenizer")
    mkdir -p "$target"
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
        [ -f "$tokenizer/$f" ] && cp "$tokenizer/$f" "$target/"
    done
    du -sh .whl .gpu
}

if [ "${1:-}" = prepare ]; then
    prepare
    exit 0
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
failed=0

step() {  # step NAME LIMIT_S COMMAND...: run it under a time limit, log it, record how it ended
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    local start=$SECONDS rc=0
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "$name: rc=$rc, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || failed=1
}

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LORAPLEX_CACHE_DIR=$PWD/.gpu/cache TOKENIZERS_PARALLELISM=false

step env 60 bash -c 'nvidia-smi; python3 -c "
import torch, triton, transformers, peft
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))
print(\"triton\", triton.__version__, \"transformers\", transformers.__version__, \"peft\", peft.__version__)
import server.engine.factory, bench.bench_gpu, tests.helpers  # everything the next steps import
"'
step cuda_tests 120 python3 -m pytest -m cuda tests/model -q -p no:randomly -p no:cacheprovider --timeout 100
step bench 285 python3 -m bench.bench_gpu "$OUT" --budget-s 230
echo "== summary"
cat "$OUT/summary.txt"
exit "$failed"
