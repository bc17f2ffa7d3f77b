#!/usr/bin/env bash
# igpt_jax on a Cloud TPU pod slice (or several slices: multislice), through gcloud from your workstation.
#
#   launch/tpu_pod.sh [--dry-run] create   NAME ZONE ACCELERATOR [SLICES]   # e.g. v5p-64; SLICES > 1: multislice
#   launch/tpu_pod.sh [--dry-run] setup    NAME ZONE [SLICES]               # copy this checkout, venv, install (idempotent)
#   launch/tpu_pod.sh [--dry-run] run      NAME ZONE [SLICES] -- IGPT_FLAGS # same command on every worker of every slice
#   launch/tpu_pod.sh [--dry-run] logs     NAME ZONE [SLICES]               # collect each worker's log into logs/NAME/
#   launch/tpu_pod.sh [--dry-run] delete   NAME ZONE [SLICES]
#
# Every worker runs `python -m igpt_jax.main ...`; JAX finds the pod's other processes by itself (no flags) and
# jax.distributed starts before anything else. With SLICES > 1 the slices come from one queued resource and the
# runtime sets the MEGASCALE variables; put the data-parallel axis across slices with --config.mesh.dcn.data=-1
# (the default). Logs stay on each worker in ~/igpt_logs/ until `logs` copies them here.
# Environment: TPU_RUNTIME (default v2-alpha-tpuv5), PROJECT (default: gcloud's), REPO_DIR (default: igpt_jax).
#
# Example (iGPT-L at 48x48 on a v5p-128, checkpoints on GCS):
#   launch/tpu_pod.sh create igpt-l us-east5-a v5p-128
#   launch/tpu_pod.sh setup  igpt-l us-east5-a
#   launch/tpu_pod.sh run    igpt-l us-east5-a -- --config=configs/igpt_l.py:48 --workdir=gs://BUCKET/igpt_l_48 \
#     --config.model.dtype=bfloat16 --config.model.remat=full --config.data.data_dir=gs://BUCKET/tfds
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
usage() {
  sed -n '4,8p' "$0" | sed 's/^# *//' >&2
  exit 2
}
[[ $# -ge 3 ]] || usage
action="$1" name="$2" zone="$3"
shift 3
runtime="${TPU_RUNTIME:-v2-alpha-tpuv5}"
repo_dir="${REPO_DIR:-igpt_jax}"
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="$PROJECT")

run() {  # prints the command; runs it unless --dry-run
  printf '%q ' "$@"
  printf '\n'
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

slices_from() {  # optional SLICES argument (a number) at the front of "$@"
  if [[ "${1:-}" =~ ^[0-9]+$ ]]; then echo "$1"; else echo 1; fi
}

nodes() {  # the TPU VM names: NAME for one slice, NAME-0 .. NAME-(k-1) for a multislice queued resource
  local slices="$1"
  if ((slices == 1)); then echo "$name"; else for ((i = 0; i < slices; i++)); do echo "$name-$i"; done; fi
}

ssh_all() {  # ssh_all SLICES COMMAND: the command on every worker of every slice, in parallel
  local slices="$1" command="$2" pids=() node
  for node in $(nodes "$slices"); do
    run gcloud compute tpus tpu-vm ssh "$node" --zone="$zone" "${project_flag[@]}" --worker=all --command="$command" &
    pids+=("$!")
  done
  local status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  return "$status"
}

case "$action" in
  create)
    [[ $# -ge 1 ]] || usage
    accelerator="$1"
    slices=$(slices_from "${@:2}")
    if ((slices == 1)); then
      run gcloud compute tpus tpu-vm create "$name" --zone="$zone" "${project_flag[@]}" \
        --accelerator-type="$accelerator" --version="$runtime"
    else
      run gcloud compute tpus queued-resources create "$name" --zone="$zone" "${project_flag[@]}" \
        --accelerator-type="$accelerator" --runtime-version="$runtime" --node-count="$slices" --node-prefix="$name"
    fi
    ;;
  setup)
    slices=$(slices_from "$@")
    for node in $(nodes "$slices"); do
      run gcloud compute tpus tpu-vm scp --recurse --zone="$zone" "${project_flag[@]}" --worker=all \
        "$(cd "$(dirname "$0")/.." && pwd)" "$node:~/$repo_dir"
    done
    ssh_all "$slices" "cd ~/$repo_dir && { [ -x .venv/bin/python ] || python3 -m venv .venv; } && \
.venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2' && mkdir -p ~/igpt_logs"
    ;;
  run)
    slices=$(slices_from "$@")
    [[ "${1:-}" =~ ^[0-9]+$ ]] && shift
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -ge 1 ]] || usage
    flags=$(printf '%q ' "$@")
    ssh_all "$slices" "cd ~/$repo_dir && .venv/bin/python -m igpt_jax.main $flags 2>&1 | \
tee -a ~/igpt_logs/\$(hostname).log; exit \${PIPESTATUS[0]}"
    ;;
  logs)
    slices=$(slices_from "$@")
    mkdir -p "logs/$name"
    for node in $(nodes "$slices"); do
      run gcloud compute tpus tpu-vm scp --recurse --zone="$zone" "${project_flag[@]}" --worker=all \
        "$node:~/igpt_logs" "logs/$name/"
    done
    ;;
  delete)
    slices=$(slices_from "$@")
    if ((slices == 1)); then
      run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" "${project_flag[@]}" --quiet
    else
      run gcloud compute tpus queued-resources delete "$name" --zone="$zone" "${project_flag[@]}" --force --quiet
    fi
    ;;
  *) usage ;;
esac
