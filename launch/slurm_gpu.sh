#!/usr/bin/env bash
# Submits cmae_jax to a SLURM GPU cluster (launch/slurm_gpu.sbatch), one process per GPU
# (default) or per node. Prints the sbatch command first; --dry_run prints only.
#
# Usage (from the repository root, on the cluster's login node):
#   bash launch/slurm_gpu.sh --nodes=8 --gpus_per_node=8 --config=configs/cmae_vitl.py \
#       --workdir=/shared/workdirs/cmae_vitl [--mode=per_gpu|per_node] [--partition=P] \
#       [--account=A] [--time=72:00:00] [--dry_run] [-- --config.key=value ...]
# The job's output goes to WORKDIR/slurm-JOBID.out. Submitting again with the same workdir
# resumes from its newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

source launch/flags.sh
NODES="" GPUS="" CONFIG="" WORKDIR="" MODE="per_gpu" PARTITION="" ACCOUNT="" TIME="" DRY_RUN=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus_per_node=*) GPUS="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --mode=*) MODE="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "Unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

require_flags "slurm_gpu.sh" --nodes "$NODES" --gpus_per_node "$GPUS" --config "$CONFIG" \
  --workdir "$WORKDIR"
case "$MODE" in
  per_gpu) TASKS="$GPUS" ;;
  per_node) TASKS=1 ;;
  *) echo "--mode must be per_gpu or per_node" >&2; exit 2 ;;
esac
[ -f "$CONFIG" ] || { echo "No config file $CONFIG" >&2; exit 2; }

OPTIONS=(--nodes="$NODES" --gpus-per-node="$GPUS" --ntasks-per-node="$TASKS"
         --output="$WORKDIR/slurm-%j.out")
[ -n "$PARTITION" ] && OPTIONS+=(--partition="$PARTITION")
[ -n "$ACCOUNT" ] && OPTIONS+=(--account="$ACCOUNT")
[ -n "$TIME" ] && OPTIONS+=(--time="$TIME")
COMMAND=(sbatch "${OPTIONS[@]}" launch/slurm_gpu.sbatch "$MODE" "$CONFIG" "$WORKDIR" "${EXTRA[@]}")
echo "Will submit: $NODES node(s) x $GPUS GPUs, $((NODES * TASKS)) process(es) ($MODE), $CONFIG -> $WORKDIR"
echo "+ $(printf '%q ' "${COMMAND[@]}")"
if [ "$DRY_RUN" = 1 ]; then
  echo "(dry run: nothing submitted)"; exit 0
fi
mkdir -p "$WORKDIR"
"${COMMAND[@]}"
