#!/usr/bin/env bash
# Train on one machine with N processes under torchrun.
#
#   launch/torchrun.sh NPROC RECIPE [key=value ...]
#
#   launch/torchrun.sh 2 recipes/quickstart.yaml                             # ddp (the default engine on N ranks)
#   launch/torchrun.sh 8 recipes/titans-mac-340m.yaml parallel.engine=fsdp
#   launch/torchrun.sh 4 recipes/quickstart.yaml parallel.cp=2                # dp 2 x cp 2
#   launch/torchrun.sh 8 RECIPE parallel.engine=deepspeed parallel.zero=3
#
# Equivalent to: torchrun --standalone --nproc_per_node NPROC -m loom.trainer train RECIPE [key=value ...]
# Runs again resume the run's output_dir, on any number of processes.
# GPUs: one process per GPU, NCCL. CPU: gloo, one thread per process unless
# OMP_NUM_THREADS is set. PYTHON picks the interpreter (default: the repo's .venv).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
NPROC=$1
RECIPE=$2
shift 2

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$([[ -x "$REPO/.venv/bin/python" ]] && echo "$REPO/.venv/bin/python" || echo python3)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Loom is imported from the installed `loom` package; PYTHONSAFEPATH keeps `-m`
# from putting the working directory (a checkout whose top-level trainer/,
# models/, kernels/ would shadow packages of those names) on sys.path.
export PYTHONSAFEPATH=1

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m loom.trainer train "$RECIPE" "$@"
