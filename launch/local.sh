#!/usr/bin/env bash
# N processes of igpt_jax on this host, talking through jax.distributed on 127.0.0.1 (CPU: gloo collectives,
# each process with its own fake devices). Logs go to one file per process; if any process fails, the others are
# stopped and the script exits with that process's status. Ctrl-C / SIGTERM is passed on to every process (they
# save a checkpoint and exit 0).
#
# Usage: launch/local.sh [--dry-run] N [igpt flags ...]
#   env: DEVICES_PER_PROCESS (fake CPU devices each, default 1), PORT (default: a free one),
#        LOG_DIR (default: logs/local-<time>), PYTHON (default: .venv/bin/python if present, else python3)
# Example: launch/local.sh 2 --config=configs/fashion_mnist.py --workdir=workdir/two --config.total_steps=5
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh [--dry-run] N [igpt flags ...]" >&2
  exit 2
fi
n="$1"
shift

cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
port="${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
log_dir="${LOG_DIR:-logs/local-$(date +%Y%m%d-%H%M%S)}"
devices="${DEVICES_PER_PROCESS:-1}"

commands=()
for ((i = 0; i < n; i++)); do
  commands+=("XLA_FLAGS=--xla_force_host_platform_device_count=$devices JAX_PLATFORMS=cpu $python -m igpt_jax.main \
--coordinator_address=127.0.0.1:$port --num_processes=$n --process_id=$i $* > $log_dir/process_$i.log 2>&1")
done
if [[ $dry_run -eq 1 ]]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

mkdir -p "$log_dir"
pids=()
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
    "$python" -m igpt_jax.main --coordinator_address="127.0.0.1:$port" --num_processes="$n" --process_id="$i" "$@" \
    >"$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "local.sh: $n processes (${pids[*]}), coordinator 127.0.0.1:$port, logs in $log_dir/"

stop_all() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
}
trap 'stop_all' INT TERM

status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  finished=""
  if wait -n -p finished "${running[@]}" 2>/dev/null; then
    rc=0
  else
    rc=$?
  fi
  if [[ -z "${finished:-}" ]]; then  # wait sets no pid: a trapped signal interrupted it, or (127) bash had
    if ((rc == 127)); then           # reaped the jobs left already; drop those that are gone, status unknown
      still=()
      for pid in "${running[@]}"; do kill -0 "$pid" 2>/dev/null && still+=("$pid"); done
      if ((${#still[@]} < ${#running[@]} && status == 0)); then
        status=1
        echo "local.sh: a process ended and its status could not be read; stopping the others" >&2
        stop_all
      fi
      running=("${still[@]+"${still[@]}"}")
    fi
    continue
  fi
  still=()
  for pid in "${running[@]}"; do [[ "$pid" != "$finished" ]] && still+=("$pid"); done
  running=("${still[@]+"${still[@]}"}")
  if ((rc != 0 && status == 0)); then
    status=$rc
    who="?"
    for ((i = 0; i < n; i++)); do [[ "${pids[$i]}" == "$finished" ]] && who=$i; done
    echo "local.sh: process $who (pid $finished) exited with status $rc; stopping the others" >&2
    tail -n 5 "$log_dir/process_$who.log" >&2 || true
    stop_all
  fi
done
exit "$status"
