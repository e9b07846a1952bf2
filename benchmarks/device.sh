#!/usr/bin/env bash
# medfound on a GPU machine lent through the `device` tool (/work/.library/device/README.md): a bare image with torch,
# timm, peft, accelerate, scikit-learn, ... (KINDS.md) but not everything medfound imports, no network, 15 minutes of
# device time a session and 10 minutes a call.
#
#   here, once:  bash benchmarks/device.sh prepare
#                the wheels of what medfound imports beyond the image (pydantic, pydantic-core, annotated-types,
#                typing-inspection, webdataset, braceexpand: found by running quality_label_efficiency.py with every
#                package the image lacks made unimportable), at the venv's versions, for the image's Python 3.12;
#                the medfound wheel of this checkout; the two MedMNIST sets; and, for `exec` only, DeepSpeed and
#                hjson (trainer.strategy=zero*: gpu_pretrain.py's matrix), built here as pure-Python wheels at the
#                venv's versions. Into .devkit/ (git-ignored, ~18 MB).
#   there:       run(command="bash benchmarks/device.sh label-efficiency pneumoniamnist", carry=[".devkit"],
#                    timeout_s=600)                         # issue 26's GPU evidence, one set per lease
#                run(command="bash benchmarks/device.sh exec python3 benchmarks/gpu_pretrain.py", carry=[".devkit"])
#
# Both install the wheels with --no-deps into /tmp/medfound_site, beside the image's packages (never over them), and
# point MEDFOUND_SHARED_DATA at the carried sets.
#
# `label-efficiency SET [options]` runs benchmarks/quality_label_efficiency.py --scale small --sets SET
# --budget-minutes 6 [options]: ViT-S/4 MAE and DINOv2 pretrained on SET's training images, each sized to this machine
# by a 60-step timing probe (MAE 30% of the budget, DINOv2 25%), then `medfound bench`. It stops itself at LE_SECONDS
# (default 540) so that the call returns its files, and packs the results, the plan with each stage's minutes, the
# pretraining metrics and the log into $OUT/label_efficiency_SET_small.tar.gz. The run folder stays on the machine
# while it is warm (30 s after a call): calling it again at once continues where it stopped (pretraining resumes from
# its checkpoint with the same plan; the bench reuses its cached features and finished runs). Unpack the tarball in
# the checkout (benchmarks/results/... and runs/...).
#
# Exercised here on the CPU (the wheels are the image's Python's; the venv has medfound already):
#   INSTALL=0 PY=.venv/bin/python LE_SECONDS=1500 bash benchmarks/device.sh label-efficiency retinamnist \
#       --pretrain-steps 4 --dino-steps 4 --lora-steps 2 --every 1 --draws 2
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.devkit
PY=${PY:-python3}
EXTRA="pydantic pydantic_core annotated-types typing-inspection webdataset braceexpand"

setup() {  # WHEEL_DIRS: the carried wheels, beside the image's packages; the carried data
    [ -d "$KIT/wheels" ] || { echo "no $KIT/wheels: run 'bash benchmarks/device.sh prepare' here and carry $KIT" >&2
                              exit 2; }
    if [ "${INSTALL:-1}" = 1 ]; then
        rm -rf /tmp/medfound_site
        local wheels=()
        for d in "$@"; do wheels+=("$KIT/$d"/*.whl); done
        $PY -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
            --target /tmp/medfound_site "${wheels[@]}"
        export PYTHONPATH=/tmp/medfound_site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/medfound_site/bin:$PATH
    fi
    export MEDFOUND_SHARED_DATA=$PWD/$KIT/data PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    $PY -c "import torch, timm, peft, medfound; print('torch', torch.__version__, 'timm', timm.__version__, 'peft', \
peft.__version__, 'medfound', medfound.__version__, 'cuda', torch.cuda.is_available())"
}

case "${1:-}" in
prepare)
    PY=.venv/bin/python
    [ -x "$PY" ] || { echo "no $PY: run 'make venv' first" >&2; exit 2; }
    rm -rf "$KIT/wheels" "$KIT/wheels-zero" && mkdir -p "$KIT/wheels" "$KIT/wheels-zero" "$KIT/data/medmnist"
    read -r -a pins <<< "$($PY -c "import importlib.metadata as m, sys
print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" $EXTRA)"
    $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$KIT/wheels" "${pins[@]}"
    $PY -m pip wheel --quiet --no-deps -w "$KIT/wheels" .
    read -r -a zero <<< "$($PY -c "import importlib.metadata as m
print(' '.join(f'{n}=={m.version(n)}' for n in ('deepspeed', 'hjson')))")"
    $PY -m pip wheel --quiet --no-deps --no-build-isolation -w "$KIT/wheels-zero" "${zero[@]}"
    src=${MEDFOUND_SHARED_DATA:-../shared/data}/medmnist
    cp "$src/pneumoniamnist.npz" "$src/retinamnist.npz" "$src/PROVENANCE.txt" "$KIT/data/medmnist/"
    ls -1 "$KIT/wheels" "$KIT/wheels-zero"
    du -sh "$KIT"
    ;;
exec)
    shift
    [ $# -gt 0 ] || { echo "usage: bash $0 exec COMMAND [ARGS...]" >&2; exit 2; }
    setup wheels wheels-zero
    exec "$@"
    ;;
label-efficiency)
    set_=${2:?usage: label-efficiency pneumoniamnist|retinamnist [quality_label_efficiency.py options]}
    shift 2
    start=$(date +%s)
    setup wheels
    mkdir -p runs
    log=runs/device_label_efficiency_$set_.log
    rc=0
    # timeout signals its whole process group: the pretraining or bench run below checkpoints and stops
    timeout --signal=TERM --kill-after=20 "$(( ${LE_SECONDS:-540} - ($(date +%s) - start) ))" \
        $PY benchmarks/quality_label_efficiency.py --scale small --sets "$set_" --budget-minutes 6 "$@" \
        2>&1 | tee -a "$log" || rc=$?
    [ "$rc" = 124 ] && echo "stopped at LE_SECONDS=${LE_SECONDS:-540}: call 'label-efficiency $set_' again at once"
    work=runs/bench/label_efficiency_small/$set_
    files=()
    for f in benchmarks/results/label_efficiency_"${set_}"_small.{json,md,png} "$log" "$work/plan.json" \
             "$work"/{mae,dino}/logs/metrics.jsonl "$work"/bench/{results.csv,results.json,paired.csv,leaderboard.md}; do
        [ -f "$f" ] && files+=("$f")
    done
    out=${OUT:-runs/device_out}
    mkdir -p "$out"
    if [ ${#files[@]} -gt 0 ]; then
        tar czf "$out/label_efficiency_${set_}_small.tar.gz" "${files[@]}"
        echo "packed ${#files[@]} files into $out/label_efficiency_${set_}_small.tar.gz after $(( $(date +%s) - start )) s"
    fi
    exit "$rc"
    ;;
*)
    echo "usage: bash $0 prepare | label-efficiency pneumoniamnist|retinamnist [options] | exec COMMAND..." >&2
    exit 2
    ;;
esac
