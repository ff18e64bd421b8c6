#!/usr/bin/env bash
# Starts or stops the four services as separate processes (distributed mode, ports
# 8001-8004) on the project's PostgreSQL and Kafka. Used by `make up` / `make down`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
run_dir="${CLOSEDLOOP_RUN_DIR:-$root/.run}"
mkdir -p "$run_dir/pids" "$run_dir/logs"
declare -A PORTS=([dispatch]=8001 [transfer]=8002 [disinfection]=8003 [projection]=8004)

start() {
  cd "$root"
  [[ -x .venv/bin/python ]] || { echo "no .venv: run 'make install' first" >&2; exit 1; }
  export CLOSEDLOOP_MODE=distributed
  export CLOSEDLOOP_PG_URL="${CLOSEDLOOP_PG_URL:-postgresql+asyncpg://closedloop@127.0.0.1:${CLOSEDLOOP_PG_PORT:-55432}/{service}}"
  export CLOSEDLOOP_KAFKA_BOOTSTRAP="${CLOSEDLOOP_KAFKA_BOOTSTRAP:-$(bash "$here/kafka.sh" bootstrap)}"
  for svc in dispatch transfer disinfection projection; do
    pidfile="$run_dir/pids/$svc.pid"
    if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then continue; fi
    nohup "$root/.venv/bin/python" -m services.runtime --service "$svc" --port "${PORTS[$svc]}" \
      </dev/null >>"$run_dir/logs/$svc.log" 2>&1 &
    echo $! >"$pidfile"
  done
  for svc in dispatch transfer disinfection projection; do
    for _ in $(seq 1 300); do
      curl -fsS "http://127.0.0.1:${PORTS[$svc]}/readyz" >/dev/null 2>&1 && break
      kill -0 "$(cat "$run_dir/pids/$svc.pid")" 2>/dev/null || { tail -30 "$run_dir/logs/$svc.log"; exit 1; }
      sleep 0.2
    done
    curl -fsS "http://127.0.0.1:${PORTS[$svc]}/readyz" >/dev/null || { tail -30 "$run_dir/logs/$svc.log"; exit 1; }
    echo "$svc: http://127.0.0.1:${PORTS[$svc]} (log $run_dir/logs/$svc.log)"
  done
}

stop() {
  for svc in dispatch transfer disinfection projection; do
    pidfile="$run_dir/pids/$svc.pid"
    [[ -f $pidfile ]] || continue
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    echo "$svc: stopped"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
