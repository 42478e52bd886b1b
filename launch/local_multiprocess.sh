#!/usr/bin/env bash
# Runs N processes of cmae_jax.main on this machine, joined by jax.distributed through a
# coordinator on 127.0.0.1: the multi-host code path (process-local data shards, global
# arrays, collective checkpoints) without a cluster. For testing; on CPU each process gets
# DEVICES fake devices, on GPU each process drives DEVICES of the machine's GPUs.
#
# Usage (from the repository root):
#   bash launch/local_multiprocess.sh --num_processes=2 --devices_per_process=4 \
#       --config=configs/fashion_mnist_cmae.py --workdir=workdirs/two_procs \
#       [--platform=cpu|gpu] [--port=PORT] [--dry_run] [-- --config.key=value ...]
# Process i logs to WORKDIR/logs/process_i.log; process 0 also prints to this terminal.
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_PROCESSES="" DEVICES="" CONFIG="" WORKDIR="" PLATFORM="cpu" PORT="" DRY_RUN=0
EXTRA=()
source launch/flags.sh
while [ $# -gt 0 ]; do
  case "$1" in
    --num_processes=*) NUM_PROCESSES="${1#*=}" ;;
    --devices_per_process=*) DEVICES="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --platform=*) PLATFORM="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "Unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

require_flags "local_multiprocess.sh" --num_processes "$NUM_PROCESSES" \
  --devices_per_process "$DEVICES" --config "$CONFIG" --workdir "$WORKDIR"
case "$PLATFORM" in cpu|gpu) ;; *) echo "--platform must be cpu or gpu" >&2; exit 2 ;; esac
if ! [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ && "$DEVICES" =~ ^[1-9][0-9]*$ ]]; then
  echo "--num_processes and --devices_per_process must be positive integers" >&2; exit 2
fi
PYTHON="${PYTHON:-python3}"
if [ -z "$PORT" ]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

echo "Will start $NUM_PROCESSES processes on 127.0.0.1:$PORT, $DEVICES $PLATFORM device(s) each."
# The command of process $1, into the array CMD.
build_command() {
  local i="$1" env_vars
  if [ "$PLATFORM" = cpu ]; then
    env_vars=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES")
  else
    env_vars=("CUDA_VISIBLE_DEVICES=$(seq -s, $((i * DEVICES)) $((i * DEVICES + DEVICES - 1)))")
  fi
  CMD=(env "${env_vars[@]}" "$PYTHON" -m cmae_jax.main "--config=$CONFIG" "--workdir=$WORKDIR"
       "--coordinator_address=127.0.0.1:$PORT" "--num_processes=$NUM_PROCESSES"
       "--process_id=$i" "${EXTRA[@]}")
}
for ((i = 0; i < NUM_PROCESSES; i++)); do
  build_command "$i"
  echo "+ [process $i, log $WORKDIR/logs/process_$i.log] $(printf '%q ' "${CMD[@]}")"
done
if [ "$DRY_RUN" = 1 ]; then
  echo "(dry run: nothing started)"; exit 0
fi

mkdir -p "$WORKDIR/logs"
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  build_command "$i"
  "${CMD[@]}" > "$WORKDIR/logs/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f --pid="${pids[0]}" "$WORKDIR/logs/process_0.log" &
# A process whose partner died would wait for it: stop all of them on the first failure.
status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then
    status=1
    echo "A process failed (see $WORKDIR/logs/); stopping the others." >&2
    for other in "${pids[@]}"; do kill "$other" 2>/dev/null || true; done
  fi
done
wait
exit "$status"
