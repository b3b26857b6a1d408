#!/usr/bin/env bash
# Every GPU figure the issues ask for, in one run on a lent GPU machine (see bench/results/):
# model throughput at the reference preset (fp32 and bf16 autocast, ours against the plain MONAI
# baseline, sampling included) and the cost of DP-SGD at the reference preset.
#
# The GPU machine has PyTorch with CUDA but none of monai, nibabel, pydantic or opacus and no
# network: their wheels travel in .whl/ (see /work/.library/device/README.md), installed here
# into /tmp/site. On a CPU, for a dry run:
# PY=.venv/bin/python PRESET=tiny DEVICE=cpu bash bench/gpu_figures.sh
set -uo pipefail
PRESET=${PRESET:-reference}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-bench/results}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ "$DEVICE" = cuda ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
$PY -c "import torch, monai, opacus; print('torch', torch.__version__, 'monai', monai.__version__, 'opacus', opacus.__version__)"

# FIDELITY=1 runs only the fidelity sweep (issue 15): every diffusion variant of
# bench/bench_fidelity.py at once on the one GPU, on the tiny preset at 32x64x64. Each variant
# writes its JSON after every sampling setting, so a run cut by the time limit keeps what it got.
if [ "${FIDELITY:-0}" = 1 ]; then
    timeout ${T_FIDELITY:-480} $PY bench/bench_fidelity.py --device "$DEVICE" --parallel 7 \
        --vqgan-steps 4000 --ldm-steps 3000 --segmenter-steps 2000 --all-samplings \
        --work /tmp/fidelity --out "$OUT/fidelity_gpu.md" 2>&1 | tee "$OUT/fidelity.log"
    exit 0
fi
# SEGMENTER=1 (issue 15, second sweep): the protocol's segmenter recipes (bench_segmenter.py) and,
# at once, the fidelity protocol with the strongest guess of a recipe for three VQ-GANs. Each
# benchmark's work folder keeps a JSON per finished part; they are copied to $OUT at the end.
if [ "${SEGMENTER:-0}" = 1 ]; then
    recipes=("f8 2000 (first sweep)" "f8 2000 batch dice" "f16 4000" "f16 4000 b4 cosine batch dice"
        "f16 4000 b4 cosine batch dice flip" "f32 4000 b4 cosine batch dice")
    timeout ${T_FIDELITY:-500} $PY bench/bench_segmenter.py --device "$DEVICE" --parallel 6 \
        --recipes "${recipes[@]}" --work /tmp/segmenter --steps-scale ${SCALE:-1} \
        --shape ${SHAPE:-32 64 64} --out "$OUT/segmenter_gpu.md" > "$OUT/segmenter.log" 2>&1 &
    for vqgan in ${VQGANS:-tiny label_balance_0.5 wide_label_balance_0.5}; do
        timeout ${T_FIDELITY:-500} $PY bench/bench_fidelity.py --device "$DEVICE" --variants area \
            --vqgan-variant "$vqgan" --segmenter-recipe f16_b4_cosine_batch_dice \
            --vqgan-steps ${VQGAN_STEPS:-4000} --ldm-steps ${LDM_STEPS:-3000} \
            --segmenter-steps ${SEGMENTER_STEPS:-3000} --samplings 5x1.5 25x1.5 --shape ${SHAPE:-32 64 64} \
            --work "/tmp/fidelity_$vqgan" --out "$OUT/fidelity_gpu_$vqgan.md" \
            > "$OUT/fidelity_$vqgan.log" 2>&1 &
    done
    wait
    for work in /tmp/segmenter /tmp/fidelity_*; do
        mkdir -p "$OUT/json/$(basename "$work")" && cp "$work"/*.json "$OUT/json/$(basename "$work")/"
    done
    tail -n 30 "$OUT"/*.log
    exit 0
fi
# Each log keeps what its benchmark printed, even if the time limit stops it early.
# DP_ONLY=1 runs only the DP-SGD figures, with the DP variant sites use (the shortest GPU run).
if [ "${DP_ONLY:-0}" = 1 ]; then
    timeout ${T_DP:-200} $PY bench/bench_dp.py --preset "$PRESET" --device "$DEVICE" \
        --variants "DP default" --repeats 5 --out "$OUT/dp_${PRESET}_${DEVICE}.md" 2>&1 | tee "$OUT/dp.log"
    exit 0
fi
timeout ${T_MODEL:-200} $PY bench/bench_model.py --preset "$PRESET" --repeats 10 --warmup 3 \
    --out "$OUT/model_${PRESET}_${DEVICE}_fp32.md" 2>&1 | tee "$OUT/model_fp32.log"
timeout ${T_MODEL_BF16:-150} $PY bench/bench_model.py --preset "$PRESET" --repeats 10 --warmup 3 \
    --bf16 --out "$OUT/model_${PRESET}_${DEVICE}_bf16.md" 2>&1 | tee "$OUT/model_bf16.log"
timeout ${T_DP:-200} $PY bench/bench_dp.py --preset "$PRESET" --device "$DEVICE" \
    --out "$OUT/dp_${PRESET}_${DEVICE}.md" 2>&1 | tee "$OUT/dp.log"
