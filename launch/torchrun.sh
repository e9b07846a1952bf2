#!/usr/bin/env bash
# Run any medfound verb on NPROC processes of this machine (GPUs if present, else CPU with gloo).
#   launch/torchrun.sh NPROC pretrain RECIPE [key=value ...]
set -euo pipefail
nproc=${1:?usage: launch/torchrun.sh NPROC VERB RECIPE [key=value ...]}
shift
exec torchrun --standalone --nproc_per_node="$nproc" -m medfound.cli "$@"
