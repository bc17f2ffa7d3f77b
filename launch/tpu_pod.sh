#!/usr/bin/env bash
# igpt_jax on a Cloud TPU pod slice (or several slices: multislice), through gcloud from your workstation.
#
#   launch/tpu_pod.sh [--dry-run] [--slices K] create NAME ZONE ACCELERATOR  # e.g. v5p-64; K > 1: multislice
#   launch/tpu_pod.sh [--dry-run] [--slices K] setup  NAME ZONE   # copy the source, venv, install (idempotent)
#   launch/tpu_pod.sh [--dry-run] [--slices K] run    NAME ZONE -- IGPT_FLAGS  # start on every worker, detached
#   launch/tpu_pod.sh [--dry-run] [--slices K] status NAME ZONE   # which workers run, each one's last progress line
#   launch/tpu_pod.sh [--dry-run] [--slices K] stop   NAME ZONE   # SIGTERM everywhere: they save and exit 0
#   launch/tpu_pod.sh [--dry-run] [--slices K] logs   NAME ZONE [--follow]  # copy all logs here / follow worker 0
#   launch/tpu_pod.sh [--dry-run] [--slices K] delete NAME ZONE
#
# Every worker runs `python -m igpt_jax.main ...`; JAX finds the pod's other processes by itself (no flags) and
# jax.distributed starts before anything else. With --slices K > 1 the slices come from one queued resource and the
# runtime sets the MEGASCALE variables; put the data-parallel axis across slices with --config.mesh.dcn.data=-1
# (the default). `run` starts the job detached on each worker (launch/tpu_worker.sh: own session, no terminal) and
# returns, so a dropped connection or a closed laptop does not end a weeks-long run; `stop` waits for the final
# checkpoint (STOP_TIMEOUT seconds, default 900). Logs and pid files stay on each worker in ~/igpt_logs/. Use a
# gs:// workdir: the VMs' disks go with the pod.
# Environment: TPU_RUNTIME (default v2-alpha-tpuv5), PROJECT (default: gcloud's), REPO_DIR (default: igpt_jax),
#   STOP_TIMEOUT.
#
# Example (iGPT-L at 48x48 on a v5p-128, checkpoints on GCS):
#   launch/tpu_pod.sh create igpt-l us-east5-a v5p-128
#   launch/tpu_pod.sh setup  igpt-l us-east5-a
#   launch/tpu_pod.sh run    igpt-l us-east5-a -- --config=configs/igpt_l.py:48 --workdir=gs://BUCKET/igpt_l_48 \
#     --config.model.dtype=bfloat16 --config.model.remat=full --config.data.data_dir=gs://BUCKET/tfds
set -euo pipefail

usage() {
  sed -n '4,10p' "$0" | sed 's/^# *//' >&2
  exit 2
}
dry_run=0
slices=1
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --slices)
      [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || usage
      slices="$2"
      shift
      ;;
    *) usage ;;
  esac
  shift
done
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

nodes() {  # the TPU VM names: NAME for one slice, NAME-0 .. NAME-(k-1) for a multislice queued resource
  if ((slices == 1)); then echo "$name"; else for ((i = 0; i < slices; i++)); do echo "$name-$i"; done; fi
}

ssh_all() {  # ssh_all COMMAND: the command on every worker of every slice, in parallel
  local command="$1" pids=() node
  for node in $(nodes); do
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
    if ((slices == 1)); then
      run gcloud compute tpus tpu-vm create "$name" --zone="$zone" "${project_flag[@]}" \
        --accelerator-type="$accelerator" --version="$runtime"
    else
      run gcloud compute tpus queued-resources create "$name" --zone="$zone" "${project_flag[@]}" \
        --accelerator-type="$accelerator" --runtime-version="$runtime" --node-count="$slices" --node-prefix="$name"
    fi
    ;;
  setup)
    # the source only: the files git tracks, as they are in this checkout (not .venv, workdirs or logs)
    source_tar="${TMPDIR:-/tmp}/igpt_jax_source.tar.gz"
    (cd "$(dirname "$0")/.." && git ls-files -z | tar --null -T - -czf "$source_tar")
    for node in $(nodes); do
      run gcloud compute tpus tpu-vm scp --zone="$zone" "${project_flag[@]}" --worker=all \
        "$source_tar" "$node:~/igpt_jax_source.tar.gz"
    done
    ssh_all "mkdir -p ~/$repo_dir && tar -xzf ~/igpt_jax_source.tar.gz -C ~/$repo_dir && cd ~/$repo_dir && \
{ [ -x .venv/bin/python ] || python3 -m venv .venv; } && .venv/bin/pip install -q --upgrade pip && \
.venv/bin/pip install -q -c constraints.txt -e '.[tpu]' && mkdir -p ~/igpt_logs"
    ;;
  run)
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -ge 1 ]] || usage
    ssh_all "cd ~/$repo_dir && bash launch/tpu_worker.sh run $(printf '%q ' "$@")"
    ;;
  status) ssh_all "cd ~/$repo_dir && bash launch/tpu_worker.sh status" ;;
  stop) ssh_all "cd ~/$repo_dir && STOP_TIMEOUT=${STOP_TIMEOUT:-900} bash launch/tpu_worker.sh stop" ;;
  logs)
    if [[ "${1:-}" == "--follow" ]]; then
      run gcloud compute tpus tpu-vm ssh "$(nodes | head -n 1)" --zone="$zone" "${project_flag[@]}" --worker=0 \
        --command="tail -n 50 -F ~/igpt_logs/\$(hostname).log"
      exit
    fi
    mkdir -p "logs/$name"
    for node in $(nodes); do
      run gcloud compute tpus tpu-vm scp --recurse --zone="$zone" "${project_flag[@]}" --worker=all \
        "$node:~/igpt_logs" "logs/$name/"
    done
    ;;
  delete)
    if ((slices == 1)); then
      run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" "${project_flag[@]}" --quiet
    else
      run gcloud compute tpus queued-resources delete "$name" --zone="$zone" "${project_flag[@]}" --force --quiet
    fi
    ;;
  *) usage ;;
esac
