#!/usr/bin/env bash
# Issue 26's GPU evidence (benchmarks/quality_label_efficiency.py --scale small: ViT-S/4 MAE and DINOv2 pretrained on
# one MedMNIST set's training images, then `medfound bench`) on a machine lent through the `device` tool, in one call.
#
#   here, once:      bash benchmarks/device_label_efficiency.sh prepare
#                    (wheels of what medfound needs beyond the machine's image, the medfound wheel of this checkout
#                    and the two MedMNIST sets, into .devkit/, which git ignores; about 12 MB)
#   on the machine:  run(command="bash benchmarks/device_label_efficiency.sh run pneumoniamnist",
#                        carry=[".devkit"], timeout_s=600)
#                    then the same with retinamnist, in a later lease (one set per lease of 15 minutes).
#
# `run` installs the wheels with --no-deps into /tmp/medfound_site (the machine's image holds torch, timm, peft, accelerate, scikit-learn,
# ...: /work/.library/device/KINDS.md; checked here by running the benchmark with every package it lacks made
# unimportable), fits the two pretrainings to --budget-minutes (default 6: MAE 30%, DINOv2 25%, each sized by a
# 60-step timing probe; the bench gets the rest), stops itself at LE_SECONDS (default 540) so the call returns its
# files, and packs the results, the plan with each stage's minutes, the pretraining logs and the log into
# $OUT/label_efficiency_SET_small.tar.gz. The run folder stays on the machine while it is warm (30 s after a call):
# calling `run` again at once continues where the first call stopped (pretraining resumes from its checkpoint, the
# bench reuses its cached features and finished runs), and the plan it chose is kept.
# Exercised here on the CPU (the wheels are for the machine's Python 3.12; the venv has medfound already):
#   INSTALL=0 PY=.venv/bin/python LE_SECONDS=1500 bash benchmarks/device_label_efficiency.sh run retinamnist \
#       --pretrain-steps 4 --dino-steps 4 --lora-steps 2 --every 1 --draws 2
# Unpack here with: tar xzf /work/.device/.../label_efficiency_SET_small.tar.gz  (benchmarks/results/... + runs/...)
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.devkit
PY=${PY:-python3}
# what medfound imports beyond the image's packages, at the versions of `make venv` (the ones the tests ran with)
EXTRA="pydantic pydantic_core annotated-types typing-inspection webdataset braceexpand"

case "${1:-}" in
prepare)
    PY=.venv/bin/python
    [ -x "$PY" ] || { echo "no $PY: run 'make venv' first" >&2; exit 2; }
    grep -qxF "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >> .git/info/exclude
    rm -rf "$KIT/wheels" && mkdir -p "$KIT/wheels" "$KIT/data/medmnist"
    read -r -a pins <<< "$($PY -c "import importlib.metadata as m, sys
print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" $EXTRA)"
    $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$KIT/wheels" "${pins[@]}"
    $PY -m pip wheel --quiet --no-deps -w "$KIT/wheels" .
    src=${MEDFOUND_SHARED_DATA:-../shared/data}/medmnist
    cp "$src/pneumoniamnist.npz" "$src/retinamnist.npz" "$src/PROVENANCE.txt" "$KIT/data/medmnist/"
    ls -1 "$KIT/wheels"
    du -sh "$KIT"
    ;;
run)
    set_=${2:?usage: run pneumoniamnist|retinamnist [extra quality_label_efficiency.py options]}
    shift 2
    [ -d "$KIT/wheels" ] || { echo "no $KIT/wheels: run 'bash $0 prepare' here and carry $KIT" >&2; exit 2; }
    start=$(date +%s)
    if [ "${INSTALL:-1}" = 1 ]; then  # beside the image's packages, never over them
        rm -rf /tmp/medfound_site
        $PY -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
            --target /tmp/medfound_site "$KIT"/wheels/*.whl
        export PYTHONPATH=/tmp/medfound_site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/medfound_site/bin:$PATH
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    $PY -c "import torch, timm, peft; print('torch', torch.__version__, 'timm', timm.__version__, 'peft', \
peft.__version__, 'cuda', torch.cuda.is_available())"
    export MEDFOUND_SHARED_DATA=$PWD/$KIT/data PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
    mkdir -p runs
    log=runs/device_label_efficiency_$set_.log
    rc=0
    timeout --signal=TERM --kill-after=20 "$(( ${LE_SECONDS:-540} - ($(date +%s) - start) ))" \
        $PY benchmarks/quality_label_efficiency.py --scale small --sets "$set_" --budget-minutes 6 "$@" \
        2>&1 | tee -a "$log" || rc=$?
    [ "$rc" = 124 ] && echo "stopped at LE_SECONDS=${LE_SECONDS:-540}: call 'run $set_' again at once to continue"
    work=runs/bench/label_efficiency_small/$set_
    files=()
    for f in benchmarks/results/label_efficiency_"${set_}"_small.{json,md,png} "$log" "$work/plan.json" \
             "$work"/{mae,dino}/logs/metrics.jsonl "$work"/bench/{results.csv,results.json,paired.csv,leaderboard.md}; do
        [ -f "$f" ] && files+=("$f")
    done
    out=${OUT:-runs/device_out}
    mkdir -p "$out"
    tar czf "$out/label_efficiency_${set_}_small.tar.gz" "${files[@]}"
    echo "packed ${#files[@]} files into $out/label_efficiency_${set_}_small.tar.gz after $(( $(date +%s) - start )) s"
    exit "$rc"
    ;;
*)
    echo "usage: bash $0 prepare | run pneumoniamnist|retinamnist [options]" >&2
    exit 2
    ;;
esac
