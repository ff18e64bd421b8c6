#!/usr/bin/env bash
# The four services as separate processes (distributed mode) on the project's PostgreSQL and
# Kafka. Used by `make up` / `make down` and by the fault tests (tests/faults).
#
#   deploy/local/services.sh start [--replicas N]  start what is not running; wait until every replica is ready
#   deploy/local/services.sh stop                  stop every replica and the balancer
#   deploy/local/services.sh status                what runs where (exit 0 all, 1 some, 3 none)
#   deploy/local/services.sh kill SERVICE R        SIGKILL replica R of SERVICE (a fault, by hand)
#   deploy/local/services.sh pid SERVICE R         print that replica's pid
#
# One replica (default): dispatch 8001, transfer 8002, disinfection 8003, projection 8004.
# N replicas: replica R of a service listens on its port + 100*R (dispatch 8101, 8201, ...),
# and deploy/local/balancer.py listens on 8001-8004 in front of them (round-robin, failing
# over to a live replica), with its counters as JSON on 8100. The base port is
# $CLOSEDLOOP_SERVICE_PORT (8001). Pids in $run_dir/pids, logs in $run_dir/logs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
run_dir="${CLOSEDLOOP_RUN_DIR:-$root/.run}"
mkdir -p "$run_dir/pids" "$run_dir/logs"
run_dir="$(cd "$run_dir" && pwd)"
SERVICES=(dispatch transfer disinfection projection)
BASE=${CLOSEDLOOP_SERVICE_PORT:-8001}
READY_TIMEOUT=${CLOSEDLOOP_SERVICE_READY_TIMEOUT:-90}
conf="$run_dir/services.replicas"

die() { echo "services.sh: $*" >&2; exit 1; }
index_of() { local i; for i in "${!SERVICES[@]}"; do [[ ${SERVICES[$i]} == "$1" ]] && { echo "$i"; return; }; done; die "no service '$1'"; }
front_port() { echo $((BASE + $(index_of "$1"))); }
replica_port() { # replica_port SERVICE R REPLICAS
  if (($3 == 1)); then front_port "$1"; else echo $((BASE + 100 * $2 + $(index_of "$1"))); fi
}
status_port() { echo $((BASE + 99)); }
pidfile() { echo "$run_dir/pids/$1.pid"; }
# a killed process whose parent is gone stays a zombie until init reaps it, which may take
# a while here: dead all the same (else a restart right after a kill would skip it)
pid_alive() {
  kill -0 "$1" 2>/dev/null || return 1
  [[ $(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) != Z ]]
}
alive() { [[ -f $(pidfile "$1") ]] && pid_alive "$(cat "$(pidfile "$1")")"; }
replicas_running() { [[ -f $conf ]] && cat "$conf" || true; }

# setsid: a Ctrl-C or a process-group kill of the caller does not reach the services
launch() { # launch NAME LOG COMMAND...
  local name=$1 logf=$2
  shift 2
  setsid nohup "$@" </dev/null >>"$logf" 2>&1 &
  echo $! >"$(pidfile "$name")"
}

wait_ready() { # wait_ready NAME PORT
  local deadline=$(($(date +%s) + READY_TIMEOUT))
  until curl -fsS -m 2 "http://127.0.0.1:$2/readyz" >/dev/null 2>&1; do
    alive "$1" || { tail -30 "$run_dir/logs/$1.log" >&2; die "$1 exited during startup (log $run_dir/logs/$1.log)"; }
    (($(date +%s) < deadline)) || { tail -30 "$run_dir/logs/$1.log" >&2; die "$1 not ready after ${READY_TIMEOUT}s"; }
    sleep 0.2 # poll interval between real readiness checks
  done
}

start() {
  local replicas=$1 have svc r name started=()
  cd "$root"
  [[ -x .venv/bin/python ]] || die "no .venv: run 'make install' first"
  have=$(replicas_running)
  if [[ -n $have && $have != "$replicas" ]] && { alive balancer || compgen -G "$run_dir/pids/*-1.pid" >/dev/null; }; then
    die "running with $have replica(s) per service, not $replicas: run '$0 stop' first"
  fi
  echo "$replicas" >"$conf"
  export CLOSEDLOOP_MODE=distributed
  # (the default in a variable of its own: a literal "}" would end the ${...:-} expansion)
  local pg_default="postgresql+asyncpg://closedloop@127.0.0.1:${CLOSEDLOOP_PG_PORT:-55432}/{service}"
  export CLOSEDLOOP_PG_URL="${CLOSEDLOOP_PG_URL:-$pg_default}"
  export CLOSEDLOOP_KAFKA_BOOTSTRAP="${CLOSEDLOOP_KAFKA_BOOTSTRAP:-$(bash "$here/kafka.sh" bootstrap)}"
  # a topic on every broker, up to three (three brokers: min.insync.replicas 2, services/settings.py)
  local brokers
  brokers=$(tr ',' '\n' <<<"$CLOSEDLOOP_KAFKA_BOOTSTRAP" | grep -c .)
  export CLOSEDLOOP_KAFKA_REPLICATION="${CLOSEDLOOP_KAFKA_REPLICATION:-$((brokers < 3 ? brokers : 3))}"
  # where each service finds the others (the projection asks each for its own chain): this
  # deployment's front ports, not the defaults (8001-8004), which may be another deployment's
  local urls="" i
  for i in "${!SERVICES[@]}"; do urls+="${urls:+,}\"${SERVICES[$i]}\":\"http://127.0.0.1:$((BASE + i))\""; done
  urls="{$urls}"
  export CLOSEDLOOP_SERVICE_URLS="${CLOSEDLOOP_SERVICE_URLS:-$urls}"
  for svc in "${SERVICES[@]}"; do
    for ((r = 1; r <= replicas; r++)); do
      name="$svc-$r"
      alive "$name" && continue
      launch "$name" "$run_dir/logs/$name.log" \
        "$root/.venv/bin/python" -m services.runtime --service "$svc" --port "$(replica_port "$svc" "$r" "$replicas")"
      started+=("$name")
    done
  done
  if ((replicas > 1)) && ! alive balancer; then
    local routes=()
    for svc in "${SERVICES[@]}"; do
      local backends=""
      for ((r = 1; r <= replicas; r++)); do backends+="${backends:+,}$(replica_port "$svc" "$r" "$replicas")"; done
      routes+=(--route "$(front_port "$svc")=$backends")
    done
    launch balancer "$run_dir/logs/balancer.log" \
      "$root/.venv/bin/python" -m deploy.local.balancer "${routes[@]}" --status "127.0.0.1:$(status_port)"
  fi
  for svc in "${SERVICES[@]}"; do
    for ((r = 1; r <= replicas; r++)); do wait_ready "$svc-$r" "$(replica_port "$svc" "$r" "$replicas")"; done
    if ((replicas > 1)); then wait_ready balancer "$(front_port "$svc")"; fi
  done
  echo "services: ${#started[@]} started (${started[*]:-none}); all ready"
  show
}

show() {
  local replicas svc r ports
  replicas=$(replicas_running)
  for svc in "${SERVICES[@]}"; do
    ports=""
    for ((r = 1; r <= ${replicas:-1}; r++)); do ports+="${ports:+, }$(replica_port "$svc" "$r" "${replicas:-1}")"; done
    if ((${replicas:-1} > 1)); then
      echo "$svc: http://127.0.0.1:$(front_port "$svc") (balancer) -> replicas on $ports (logs $run_dir/logs/$svc-*.log)"
    else
      echo "$svc: http://127.0.0.1:$ports (log $run_dir/logs/$svc-1.log)"
    fi
  done
}

stop_pid() { # stop_pid NAME: SIGTERM, SIGKILL after 10 s
  local pid
  [[ -f $(pidfile "$1") ]] || return 0
  pid=$(cat "$(pidfile "$1")")
  if pid_alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do pid_alive "$pid" || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$(pidfile "$1")"
}

stop() {
  local f name pids=()
  stop_pid balancer
  # in parallel: each service takes a few seconds to drain its consumers and relay
  for f in "$run_dir"/pids/*.pid; do
    [[ -e $f ]] || continue
    name=$(basename "$f" .pid)
    stop_pid "$name" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  rm -f "$conf"
  echo "services: stopped"
}

status() {
  local replicas svc r up=0 down=0
  replicas=$(replicas_running)
  [[ -n $replicas ]] || { echo "services: not running"; return 3; }
  for svc in "${SERVICES[@]}"; do
    for ((r = 1; r <= replicas; r++)); do
      if alive "$svc-$r"; then up=$((up + 1)); echo "$svc-$r: pid $(cat "$(pidfile "$svc-$r")"), port $(replica_port "$svc" "$r" "$replicas")"
      else down=$((down + 1)); echo "$svc-$r: not running"; fi
    done
  done
  if ((replicas > 1)); then
    if alive balancer; then echo "balancer: pid $(cat "$(pidfile balancer)"), status http://127.0.0.1:$(status_port)"
    else down=$((down + 1)); echo "balancer: not running"; fi
  fi
  ((up == 0)) && return 3
  ((down == 0)) && return 0
  return 1
}

replica_name() { # replica_name SERVICE R
  index_of "$1" >/dev/null
  [[ $2 =~ ^[0-9]+$ ]] || die "replica must be a number, got '$2'"
  alive "$1-$2" || die "$1-$2 is not running"
  echo "$1-$2"
}

cmd=${1:-}
shift || true
case $cmd in
  start)
    replicas=${CLOSEDLOOP_REPLICAS:-$(replicas_running)}
    replicas=${replicas:-1}
    while (($#)); do
      case $1 in
        --replicas) replicas=${2:-}; shift 2 || shift ;;
        --replicas=*) replicas=${1#--replicas=}; shift ;;
        *) die "unknown argument: $1" ;;
      esac
    done
    [[ $replicas =~ ^[1-9]$ ]] || die "--replicas must be 1..9, got '$replicas'"
    start "$replicas"
    ;;
  stop) stop ;;
  status) status ;;
  kill) (($# == 2)) || die "usage: $0 kill SERVICE R"; name=$(replica_name "$1" "$2"); kill -KILL "$(cat "$(pidfile "$name")")"; echo "$name: killed" ;;
  pid) (($# == 2)) || die "usage: $0 pid SERVICE R"; cat "$(pidfile "$(replica_name "$1" "$2")")" ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
