#!/usr/bin/env bash
# Train with DeepSpeed's launcher (parallel.engine=deepspeed is set for you).
#
#   launch/deepspeed.sh NGPUS RECIPE [key=value ...]            one machine, NGPUS processes
#   launch/deepspeed.sh HOSTFILE RECIPE [key=value ...]         several machines (see launch/hostfile.example)
#
#   launch/deepspeed.sh 2 recipes/quickstart.yaml parallel.zero=2
#   launch/deepspeed.sh 8 RECIPE parallel.zero=3 parallel.offload_optimizer=true
#   launch/deepspeed.sh 8 RECIPE parallel.deepspeed_config=recipes/deepspeed/zero3-offload.json
#   launch/deepspeed.sh launch/hostfile RECIPE parallel.zero=3
#
# Equivalent to: deepspeed --num_gpus NGPUS --module loom.trainer train RECIPE parallel.engine=deepspeed ...
# On a machine without GPUs DS_ACCELERATOR=cpu is exported and NGPUS CPU
# processes run with gloo. MASTER_PORT picks the rendezvous port (default 29500).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
WHERE=$1
RECIPE=$2
shift 2

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEEPSPEED=${DEEPSPEED:-$([[ -x "$REPO/.venv/bin/deepspeed" ]] && echo "$REPO/.venv/bin/deepspeed" || echo deepspeed)}
# Loom is imported from the installed `loom` package; PYTHONSAFEPATH keeps `-m`
# from putting the working directory (a checkout whose top-level trainer/,
# models/, kernels/ would shadow packages of those names) on sys.path.
export PYTHONSAFEPATH=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi

if [[ -f "$WHERE" ]]; then
    placement=(--hostfile "$WHERE")
else
    placement=(--num_gpus "$WHERE")
fi
exec "$DEEPSPEED" "${placement[@]}" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
    --module loom.trainer train "$RECIPE" parallel.engine=deepspeed "$@"
