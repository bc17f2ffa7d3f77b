#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh: what each TPU VM runs through `gcloud ... ssh --worker=all`, in the checkout.
#
#   bash launch/tpu_worker.sh run IGPT_FLAGS...  # start igpt_jax detached from the connection; returns at once
#   bash launch/tpu_worker.sh status             # running or not, and the last progress line of the log
#   bash launch/tpu_worker.sh stop               # SIGTERM, then wait for the final checkpoint and the exit
#
# The job runs in its own session (setsid), with no terminal and stdin closed (nohup), so a dropped ssh connection or
# a closed laptop cannot hang it up. Its pid goes to $IGPT_LOGS/igpt.pid and its output to $IGPT_LOGS/HOSTNAME.log,
# which ends with "igpt exited with status N". `run` refuses while a job runs; `stop` exits 0 only when the job saved
# and exited 0 within STOP_TIMEOUT seconds.
# Environment: IGPT_LOGS (default ~/igpt_logs), PYTHON (default .venv/bin/python), STOP_TIMEOUT (default 900).
set -euo pipefail
cd "$(dirname "$0")/.."
logs="${IGPT_LOGS:-$HOME/igpt_logs}"
log="$logs/$(hostname).log"
pid_file="$logs/igpt.pid"
python="${PYTHON:-.venv/bin/python}"
me="$(hostname)"

running() { [[ -s "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }

case "${1:-}" in
  run)
    shift
    mkdir -p "$logs"
    if running; then
      echo "$me: igpt already runs (pid $(cat "$pid_file")); stop it first" >&2
      exit 1
    fi
    rm -f "$pid_file"
    # The inner shell starts python, records its pid, and appends its exit status to the log when it ends.
    # shellcheck disable=SC2016  # expanded by the inner shell
    setsid nohup bash -c '"$@" < /dev/null & echo $! > "$0"; wait $!; echo "igpt exited with status $?"' \
      "$pid_file" "$python" -m igpt_jax.main "$@" >>"$log" 2>&1 </dev/null &
    for _ in $(seq 100); do
      [[ -s "$pid_file" ]] && break
      sleep 0.1
    done
    echo "$me: started igpt (pid $(cat "$pid_file" 2>/dev/null || echo '?')), log $log"
    ;;
  status)
    last=$(grep -E '^(step |eval step |igpt)' "$log" 2>/dev/null | tail -n 1 || true)
    if running; then state="running (pid $(cat "$pid_file"))"; else state="not running"; fi
    echo "$me: $state; ${last:-no log yet}"
    ;;
  stop)
    if ! running; then
      echo "$me: not running; $(tail -n 1 "$log" 2>/dev/null || echo 'no log')"
      exit 0
    fi
    pid=$(cat "$pid_file")
    before=$(wc -l <"$log")  # what this stop adds to the log comes after this line
    kill -TERM "$pid"
    waited=0
    while kill -0 "$pid" 2>/dev/null && ((waited < ${STOP_TIMEOUT:-900})); do
      sleep 1
      waited=$((waited + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$me: still saving after ${waited}s (pid $pid); check again with status" >&2
      exit 1
    fi
    for _ in $(seq 50); do  # the inner shell writes the status line just after python ends
      ended=$(tail -n +"$((before + 1))" "$log" | grep 'igpt exited with status' | tail -n 1 || true)
      [[ -n "$ended" ]] && break
      sleep 0.1
    done
    saved=$(tail -n +"$((before + 1))" "$log" | grep -o 'stopped on request: saved step [0-9]*' | tail -n 1 || true)
    echo "$me: ${saved:-stopped}; ${ended:-no exit status in the log}"
    [[ "$ended" == "igpt exited with status 0" ]]
    ;;
  *)
    sed -n '4,6p' "$0" | sed 's/^# *//' >&2
    exit 2
    ;;
esac
