#!/usr/bin/env bash
# One short session on one GPU (at most ~8 minutes): the bench/gpu_mfu.py settings not yet measured there, most
# wanted first, each in its own process with its own time limit, so that one failing or slow setting does not
# cost the others. Results (JSON per setting) and logs go to $OUT (default ./gpu_session).
#
#     bash bench/gpu_session.sh              # on the GPU machine, from the repository root
#     TINY=1 PYTHON=.venv/bin/python bash bench/gpu_session.sh    # a dry run of the same flow on a CPU
#
# DeepSpeed and its pure-Python dependencies are installed from ./.whl when the machine lacks them (a machine
# without internet: `pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl deepspeed==0.19.8
# hjson pydantic pydantic-core annotated-types typing-inspection` beforehand).
set -u
OUT=${OUT:-gpu_session}
mkdir -p "$OUT"
PY=${PYTHON:-python}

if ! $PY -c "import deepspeed" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/gpu.txt"

run() {  # run NAME SECONDS ARGS...: one setting
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    # TINY: after the setting's own flags, so it wins (flex attention has no backward on a CPU)
    timeout "$limit" $PY bench/gpu_mfu.py --out "$OUT/$name.json" "$@" ${TINY:+--tiny --steps 2 --warmup 1 --attn sdpa} \
        >"$OUT/$name.log" 2>&1
    local code=$?
    echo "== $name (exit $code, $((SECONDS - t0)) s): $*"
    grep -E "^ZeRO-|failed" "$OUT/$name.log" || tail -n 5 "$OUT/$name".stage*.log  # the child's own output
}

# Compiled layers under ZeRO-3 as the trainer now builds them (each layer a DeepSpeed leaf module).
run zero3_flex_compiled 170 --stages 3 --attn flex_attention --compile
# The fastest setting found (43.6% MFU) with twice the micro-batch, its logits in pieces, and a background save.
run zero0_flex_compiled_micro16 150 --stages 0 --attn flex_attention --compile --micro 16 --loss-chunk 16384 \
    --save-dir /tmp/infinitune_ck --async-save
# The same at micro-batch 8 with a background save, against the table's synchronous 38 s.
run zero0_flex_compiled_async 130 --stages 0 --attn flex_attention --compile --save-dir /tmp/infinitune_ck \
    --async-save
# The first setting as the loop stepped before #14: the step's numbers read back through the device each step.
run zero3_flex_compiled_host_sync 120 --stages 3 --attn flex_attention --compile --host-sync
echo "results in $OUT"
