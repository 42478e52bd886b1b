#!/usr/bin/env bash
# Cloud TPU VM life cycle for cmae_jax with gcloud: create the slice (directly or as a
# queued resource), install this repository on every worker, train on all workers at once,
# follow the log, stop or delete. Every step prints the gcloud commands before running them;
# --dry_run prints only.
#
# Usage (from the repository root; NAME, ZONE and, for create, TYPE are always required):
#   bash launch/tpu_vm.sh create  --name=NAME --zone=ZONE --type=v5litepod-64 [--queued] [--spot]
#                                 [--version=RUNTIME] [--project=PROJECT]
#   bash launch/tpu_vm.sh install --name=NAME --zone=ZONE
#   bash launch/tpu_vm.sh train   --name=NAME --zone=ZONE --config=configs/cmae_vitl.py \
#                                 --workdir=gs://BUCKET/cmae_vitl [-- --config.key=value ...]
#   bash launch/tpu_vm.sh logs    --name=NAME --zone=ZONE
#   bash launch/tpu_vm.sh stop    --name=NAME --zone=ZONE      (keeps the disks; `start` resumes)
#   bash launch/tpu_vm.sh delete  --name=NAME --zone=ZONE [--queued]
#   bash launch/tpu_vm.sh keep-alive --name=NAME --zone=ZONE --type=v5litepod-64 [--queued] [--spot]
#                                 --config=... --workdir=gs://... [--poll=300] [-- overrides]
# train starts in the background on every worker (log: ~/cmae_train.log on each); running
# it again after a preemption resumes from the newest checkpoint in the workdir. A SIGTERM
# (what a spot VM gets before preemption) makes every worker save at the next step and exit.
# keep-alive runs on your own machine until the run has finished (WORKDIR/results.json
# exists): every --poll seconds it looks at the slice and, when it is gone or PREEMPTED,
# deletes it, creates (or re-queues) it again, installs and starts train, which resumes.
# With --dry_run it prints the commands of one such round and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

source launch/flags.sh
ACTION="${1:-}"
[ $# -gt 0 ] && shift
NAME="" ZONE="" TYPE="" VERSION="" PROJECT="" CONFIG="" WORKDIR="" QUEUED=0 SPOT=0 DRY_RUN=0
POLL=300
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --dry_run) DRY_RUN=1 ;;
    --poll=*) POLL="${1#*=}" ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "Unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

# require --name --zone ...: the action's required flags, read from their variables.
require() {
  local args=() flag var
  for flag in "$@"; do
    var="${flag#--}"
    var="${var^^}"
    args+=("$flag" "${!var}")
  done
  require_flags "$ACTION" "${args[@]}"
}

# Prints a command, then runs it unless --dry_run.
run() {
  echo "+ $(printf '%q ' "$@")"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

PROJECT_FLAG=()
[ -n "$PROJECT" ] && PROJECT_FLAG=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
REPO_DIR="cmae_jax"  # on every worker, in the home directory
JAX_VERSION="$(sed -n 's/^jax==//p' requirements.txt)"

case "$ACTION" in
  create)
    require --name --zone --type
    if [ -z "$VERSION" ]; then
      # The TPU software image that goes with each generation.
      case "$TYPE" in
        v4-*) VERSION="tpu-ubuntu2204-base" ;;
        v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
        v5p-*) VERSION="v2-alpha-tpuv5" ;;
        v6e-*) VERSION="v2-alpha-tpuv6e" ;;
        *) echo "No default --version for --type=$TYPE; pass --version=RUNTIME" >&2; exit 2 ;;
      esac
    fi
    SPOT_FLAG=()
    [ "$SPOT" = 1 ] && SPOT_FLAG=(--spot)
    echo "Creating TPU $NAME ($TYPE, runtime $VERSION) in $ZONE$([ "$QUEUED" = 1 ] && echo ' as a queued resource')."
    if [ "$QUEUED" = 1 ]; then
      run "${QR[@]}" create "$NAME" --node-id="$NAME" --zone="$ZONE" \
        --accelerator-type="$TYPE" --runtime-version="$VERSION" "${SPOT_FLAG[@]}" "${PROJECT_FLAG[@]}"
      echo "The slice exists once this shows ACTIVE:"
      run "${QR[@]}" describe "$NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}"
    else
      run "${TPU[@]}" create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" \
        --version="$VERSION" "${SPOT_FLAG[@]}" "${PROJECT_FLAG[@]}"
    fi
    ;;
  install)
    require --name --zone
    echo "Copying this repository to ~/$REPO_DIR on every worker of $NAME and installing"
    echo "jax[tpu]==$JAX_VERSION, the requirements and the package there."
    ARCHIVE="$(mktemp -d)/cmae_jax.tar.gz"
    run tar czf "$ARCHIVE" --exclude=.git --exclude=workdirs --exclude='*.egg-info' .
    run "${TPU[@]}" scp "$ARCHIVE" "$NAME:~/" --zone="$ZONE" --worker=all "${PROJECT_FLAG[@]}"
    run "${TPU[@]}" ssh "$NAME" --zone="$ZONE" --worker=all "${PROJECT_FLAG[@]}" --command="\
mkdir -p ~/$REPO_DIR && tar xzf ~/cmae_jax.tar.gz -C ~/$REPO_DIR && cd ~/$REPO_DIR && \
python3 -m pip install -q 'jax[tpu]==$JAX_VERSION' && \
python3 -m pip install -q -r requirements.txt && python3 -m pip install -q --no-deps -e ."
    ;;
  train)
    require --name --zone --config --workdir
    case "$WORKDIR" in
      gs://*) ;;
      *) echo "--workdir must be a gs:// folder: every worker writes its part of the checkpoints there." >&2; exit 2 ;;
    esac
    ARGS="$(printf '%q ' "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")"
    echo "Training on every worker of $NAME: python3 -m cmae_jax.main $ARGS"
    echo "(jax.distributed finds the other workers by itself on a TPU VM.)"
    run "${TPU[@]}" ssh "$NAME" --zone="$ZONE" --worker=all "${PROJECT_FLAG[@]}" --command="\
cd ~/$REPO_DIR && setsid nohup python3 -m cmae_jax.main $ARGS > ~/cmae_train.log 2>&1 < /dev/null &"
    echo "Follow it with: bash launch/tpu_vm.sh logs --name=$NAME --zone=$ZONE"
    ;;
  logs)
    require --name --zone
    run "${TPU[@]}" ssh "$NAME" --zone="$ZONE" --worker=0 "${PROJECT_FLAG[@]}" \
      --command="tail -n 50 -f ~/cmae_train.log"
    ;;
  stop|start)
    require --name --zone
    echo "TPU $NAME in $ZONE: $ACTION."
    run "${TPU[@]}" "$ACTION" "$NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}"
    ;;
  delete)
    require --name --zone
    echo "Deleting TPU $NAME in $ZONE$([ "$QUEUED" = 1 ] && echo ' and its queued resource')."
    if [ "$QUEUED" = 1 ]; then
      run "${QR[@]}" delete "$NAME" --zone="$ZONE" --force --quiet "${PROJECT_FLAG[@]}"
    else
      run "${TPU[@]}" delete "$NAME" --zone="$ZONE" --quiet "${PROJECT_FLAG[@]}"
    fi
    ;;
  keep-alive)
    require --name --zone --type --config --workdir
    # The same flags for the actions this loop runs again.
    SAME=(--name="$NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}")
    CREATE=("${SAME[@]}" --type="$TYPE")
    [ -n "$VERSION" ] && CREATE+=(--version="$VERSION")
    [ "$QUEUED" = 1 ] && CREATE+=(--queued)
    [ "$SPOT" = 1 ] && CREATE+=(--spot)
    DELETE=("${SAME[@]}")
    [ "$QUEUED" = 1 ] && DELETE+=(--queued)
    TRAIN=("${SAME[@]}" --config="$CONFIG" --workdir="$WORKDIR")
    DRY=()
    [ "$DRY_RUN" = 1 ] && DRY=(--dry_run)
    recreate() {
      echo "Slice $NAME is ${1:-gone}: deleting, creating it again, installing, resuming."
      bash "$0" delete "${DELETE[@]}" "${DRY[@]}" || true
      bash "$0" create "${CREATE[@]}" "${DRY[@]}"
      if [ "$DRY_RUN" = 0 ]; then
        until [ "$(tpu_state)" = READY ]; do sleep 60; done
      else
        echo "+ (wait until the slice is READY)"
      fi
      bash "$0" install "${SAME[@]}" "${DRY[@]}"
      bash "$0" train "${TRAIN[@]}" "${DRY[@]}" -- "${EXTRA[@]}"
    }
    tpu_state() {
      "${TPU[@]}" describe "$NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
        --format='value(state)' 2>/dev/null || echo GONE
    }
    if [ "$DRY_RUN" = 1 ]; then
      echo "One round of keep-alive after a preemption (--dry_run):"
      recreate PREEMPTED
      exit 0
    fi
    while ! gcloud storage ls "$WORKDIR/results.json" >/dev/null 2>&1; do
      state="$(tpu_state)"
      case "$state" in
        READY) ;;
        PREEMPTED|TERMINATED|GONE|"") recreate "$state" ;;
        *) echo "Slice $NAME is $state; looking again in $POLL s." ;;
      esac
      sleep "$POLL"
    done
    echo "The run in $WORKDIR has finished (results.json)."
    ;;
  ""|-h|--help) usage; [ -n "$ACTION" ] && exit 0; exit 2 ;;
  *) echo "Unknown action: $ACTION" >&2; usage >&2; exit 2 ;;
esac
