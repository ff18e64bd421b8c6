#!/usr/bin/env bash
# Throwaway Apache Kafka (KRaft, no ZooKeeper) on 127.0.0.1 for tests and `make up`.
#
#   deploy/local/kafka.sh start [--nodes 1|3]   start (idempotent); waits until every broker answers
#   deploy/local/kafka.sh stop                  stop all nodes and delete their data (no-op if none run)
#   deploy/local/kafka.sh status                exit 0 all nodes up, 1 some, 3 none
#   deploy/local/kafka.sh bootstrap [--nodes N] print the bootstrap servers string
#   deploy/local/kafka.sh stop-node N [--kill]  stop one node (SIGTERM; --kill: SIGKILL), keep its data
#   deploy/local/kafka.sh start-node N          start that node again and wait until it is back
#
# The broker is the real one from Maven Central (see kafka/pom.xml), fetched once
# with Maven into $CLOSEDLOOP_CACHE_DIR/kafka-<version>/libs and run with the machine's java.
# State: $CLOSEDLOOP_RUN_DIR/kafka (deleted by stop); logs: $CLOSEDLOOP_RUN_DIR/logs/kafka-node-N/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
RUN_DIR=${CLOSEDLOOP_RUN_DIR:-$REPO/.run}
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
CACHE_DIR=${CLOSEDLOOP_CACHE_DIR:-${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}/.cache/closedloop}
BASE_PORT=${CLOSEDLOOP_KAFKA_PORT:-59092}
CTRL_BASE_PORT=${CLOSEDLOOP_KAFKA_CONTROLLER_PORT:-$((BASE_PORT + 100))}
HEAP=${CLOSEDLOOP_KAFKA_HEAP:-512m}
READY_TIMEOUT=${CLOSEDLOOP_KAFKA_READY_TIMEOUT:-90}
STOP_TIMEOUT=${CLOSEDLOOP_KAFKA_STOP_TIMEOUT:-30}
HOST=127.0.0.1

POM=$HERE/kafka/pom.xml
VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n1)
[[ -n $VERSION ]] || { echo "kafka.sh: no <kafka.version> in $POM" >&2; exit 1; }
DIST=$CACHE_DIR/kafka-$VERSION
LIBS=$DIST/libs
STATE=$RUN_DIR/kafka
LOGS=$RUN_DIR/logs
JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java

die() { echo "kafka.sh: $*" >&2; exit 1; }
now() { echo "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

broker_port() { echo $((BASE_PORT + $1 - 1)); }
ctrl_port() { echo $((CTRL_BASE_PORT + $1 - 1)); }
node_dir() { echo "$STATE/node-$1"; }
node_logs() { echo "$LOGS/kafka-node-$1"; }

configured_nodes() { [[ -f $STATE/nodes ]] && cat "$STATE/nodes" || true; }

bootstrap_for() { # bootstrap_for COUNT
  local n s=""
  for ((n = 1; n <= $1; n++)); do s+="${s:+,}$HOST:$(broker_port "$n")"; done
  echo "$s"
}

# pid of node N's broker if it runs (pid file and a matching command line), else fail
node_pid() {
  local pidf pid
  pidf=$(node_dir "$1")/kafka.pid
  [[ -f $pidf ]] || return 1
  pid=$(<"$pidf")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$(node_dir "$1")/server.properties" || return 1
  echo "$pid"
}

port_open() { (: <"/dev/tcp/$HOST/$1") 2>/dev/null; }

log_tail() { # log_tail N
  local d
  d=$(node_logs "$1")
  for f in "$d/stdout.log" "$d/server.log"; do
    [[ -f $f ]] || continue
    echo "----- tail of $f -----" >&2
    tail -n 40 "$f" >&2
  done
}

lock() { # serialize concurrent callers (parallel test workers, make up + make test)
  exec 9>"$RUN_DIR/kafka.lock"
  flock -w 600 9 || die "could not lock $RUN_DIR/kafka.lock"
}

ensure_jars() {
  local want t0 tmp
  want=$(sha256sum "$POM" | cut -d' ' -f1)
  if [[ -f $DIST/.complete && $(<"$DIST/.complete") == "$want" ]]; then return 0; fi
  command -v mvn >/dev/null || die "mvn not found (Maven is needed to fetch Kafka $VERSION)"
  mkdir -p "$DIST" "$LOGS"
  exec 8>"$CACHE_DIR/.kafka-$VERSION.lock"
  flock -w 900 8 || die "could not lock $CACHE_DIR/.kafka-$VERSION.lock"
  if [[ -f $DIST/.complete && $(<"$DIST/.complete") == "$want" ]]; then exec 8>&-; return 0; fi
  echo "kafka.sh: fetching Apache Kafka $VERSION from Maven Central into $LIBS ..."
  t0=$(now)
  tmp=$DIST/libs.tmp.$$
  rm -rf "$tmp"
  if ! mvn -B -q -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$tmp" >"$LOGS/kafka-maven.log" 2>&1; then
    tail -n 40 "$LOGS/kafka-maven.log" >&2
    rm -rf "$tmp"
    die "Maven could not fetch Kafka $VERSION (full log: $LOGS/kafka-maven.log)"
  fi
  [[ -f $tmp/kafka_2.13-$VERSION.jar ]] || die "kafka_2.13-$VERSION.jar missing after Maven ran"
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
  echo "$want" >"$DIST/.complete"
  exec 8>&-
  echo "kafka.sh: fetched $(ls "$LIBS" | wc -l) jars in $(elapsed "$t0")s"
}

write_log4j() {
  mkdir -p "$STATE"
  cat >"$STATE/log4j.properties" <<'EOF'
log4j.rootLogger=INFO, server
log4j.appender.server=org.apache.log4j.FileAppender
log4j.appender.server.File=${kafka.logs.dir}/server.log
log4j.appender.server.Append=true
log4j.appender.server.layout=org.apache.log4j.PatternLayout
log4j.appender.server.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.appender.stateChange=org.apache.log4j.FileAppender
log4j.appender.stateChange.File=${kafka.logs.dir}/state-change.log
log4j.appender.stateChange.Append=true
log4j.appender.stateChange.layout=org.apache.log4j.PatternLayout
log4j.appender.stateChange.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.state.change.logger=INFO, stateChange
log4j.additivity.state.change.logger=false
log4j.logger.kafka.request.logger=WARN
log4j.logger.org.apache.zookeeper=WARN
EOF
  cat >"$STATE/tools-log4j.properties" <<'EOF'
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.Target=System.err
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n
EOF
  cat >"$STATE/tools.properties" <<'EOF'
request.timeout.ms=5000
default.api.timeout.ms=10000
EOF
}

write_config() { # write_config N COUNT
  local n=$1 count=$2 d voters="" i rf isr
  d=$(node_dir "$n")
  mkdir -p "$d/data" "$(node_logs "$n")"
  for ((i = 1; i <= count; i++)); do voters+="${voters:+,}$i@$HOST:$(ctrl_port "$i")"; done
  rf=$count
  if ((count >= 3)); then isr=2; else isr=1; fi
  cat >"$d/server.properties" <<EOF
# generated by deploy/local/kafka.sh: node $n of $count (KRaft, combined broker+controller)
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$voters
listeners=PLAINTEXT://$HOST:$(broker_port "$n"),CONTROLLER://$HOST:$(ctrl_port "$n")
advertised.listeners=PLAINTEXT://$HOST:$(broker_port "$n")
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$d/data
metadata.log.dir=$d/data

auto.create.topics.enable=true
delete.topic.enable=true
num.partitions=3
default.replication.factor=$rf
min.insync.replicas=$isr
unclean.leader.election.enable=false
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
transaction.state.log.num.partitions=10
group.initial.rebalance.delay.ms=0
# a killed node is fenced (its partitions move, it may re-register) after 6 s, not 9 s
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=6000

num.network.threads=3
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=168
log.segment.bytes=104857600
EOF
}

format_node() { # format_node N CLUSTER_ID
  local d l
  d=$(node_dir "$1")
  l=$(node_logs "$1")
  if ! "$JAVA" -Xmx256m -Dlog4j.configuration="file:$STATE/tools-log4j.properties" -cp "$LIBS/*" \
      kafka.tools.StorageTool format -t "$2" -c "$d/server.properties" --ignore-formatted \
      >"$l/format.log" 2>&1 9>&-; then
    cat "$l/format.log" >&2
    return 1
  fi
}

launch_node() { # launch_node N
  local n=$1 d l
  d=$(node_dir "$n")
  l=$(node_logs "$n")
  mkdir -p "$l"
  [[ -f $l/server.log ]] && mv -f "$l/server.log" "$l/server.log.prev"
  [[ -f $l/stdout.log ]] && mv -f "$l/stdout.log" "$l/stdout.log.prev"
  rm -f "$d/kafka.pid"
  # own session, so a Ctrl-C or a process-group kill of the caller does not reach it;
  # no inherited fds (the lock, the caller's pipes)
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$d/kafka.pid" \
    "$JAVA" -Xms256m "-Xmx$HEAP" -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true \
    "-Dkafka.logs.dir=$l" "-Dlog4j.configuration=file:$STATE/log4j.properties" \
    -cp "$LIBS/*" kafka.Kafka "$d/server.properties" \
    </dev/null >"$l/stdout.log" 2>&1 9>&- &
  disown || true
  # the pid file is written by the launched process itself: wait for it (bounded)
  local i
  for ((i = 0; i < 100; i++)); do [[ -s $d/kafka.pid ]] && return 0; sleep 0.05; done
  die "node $n: no pid file after 5s ($d/kafka.pid)"
}

# ids of the brokers that answer through the given bootstrap list (one metadata + ApiVersions round)
brokers_answering() { # brokers_answering BOOTSTRAP
  timeout 30 "$JAVA" -Xmx128m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
    -Dlog4j.configuration="file:$STATE/tools-log4j.properties" -cp "$LIBS/*" \
    kafka.admin.BrokerApiVersionsCommand --bootstrap-server "$1" --command-config "$STATE/tools.properties" \
    2>/dev/null 9>&- | sed -n 's/.*(id: \([0-9]*\) rack: [^)]*) -> (.*/\1/p' | sort -n | tr '\n' ' ' || true
}

# wait until every node in NODES listens and the cluster metadata lists all of them
wait_ready() { # wait_ready T0 NODES...
  local t0=$1 n pid ok bootstrap="" got want
  shift
  local deadline=$(($(date +%s) + READY_TIMEOUT))
  for n in "$@"; do bootstrap+="${bootstrap:+,}$HOST:$(broker_port "$n")"; done
  want=$(printf '%s\n' "$@" | sort -n | tr '\n' ' ')
  while :; do
    ok=1
    for n in "$@"; do
      if ! pid=$(node_pid "$n"); then
        log_tail "$n"
        echo "kafka.sh: node $n exited during startup; logs in $(node_logs "$n")" >&2
        return 1
      fi
      port_open "$(broker_port "$n")" || ok=0
    done
    if ((ok)); then
      # the real check: the brokers answer a metadata request and all of them are registered
      got=$(brokers_answering "$bootstrap")
      local all=1
      for n in "$@"; do [[ " $got " == *" $n "* ]] || all=0; done
      ((all)) && break
    fi
    if (($(date +%s) >= deadline)); then
      for n in "$@"; do log_tail "$n"; done
      echo "kafka.sh: not ready after ${READY_TIMEOUT}s (want brokers: $want, answering: ${got:-none}); logs in $LOGS" >&2
      return 1
    fi
    sleep 0.2 # poll interval between real checks
  done
}

check_ports_free() { # check_ports_free N...
  local n p
  for n in "$@"; do
    for p in "$(broker_port "$n")" "$(ctrl_port "$n")"; do
      if port_open "$p"; then
        die "port $p is already in use by another process (not this run dir's Kafka: $STATE); stop it or set CLOSEDLOOP_KAFKA_PORT"
      fi
    done
  done
}

cluster_id() {
  local id
  while :; do
    id=$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
    [[ $id != -* ]] && { echo "$id"; return; }
  done
}

stop_pids() { # stop_pids SIGNAL PID... : signal, wait up to STOP_TIMEOUT, then SIGKILL
  local sig=$1 pid alive deadline
  shift
  (($# == 0)) && return 0
  kill "-$sig" "$@" 2>/dev/null || true
  deadline=$(($(date +%s) + STOP_TIMEOUT))
  while :; do
    alive=()
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    ((${#alive[@]} == 0)) && return 0
    if (($(date +%s) >= deadline)); then
      echo "kafka.sh: pids ${alive[*]} still running after ${STOP_TIMEOUT}s, sending SIGKILL" >&2
      kill -KILL "${alive[@]}" 2>/dev/null || true
      for pid in "${alive[@]}"; do while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done; done
      return 0
    fi
    sleep 0.1
  done
}

cmd_start() {
  local count=$1 have n t0 missing=() cid
  lock
  have=$(configured_nodes)
  if [[ -n $have ]]; then
    missing=()
    local running=0
    for ((n = 1; n <= have; n++)); do
      if node_pid "$n" >/dev/null; then running=$((running + 1)); else missing+=("$n"); fi
    done
    if ((running > 0)); then
      if [[ -n ${NODES_GIVEN:-} && $count != "$have" ]]; then
        die "already running with $have node(s), not $count: run '$0 stop' first"
      fi
      if ((${#missing[@]} == 0)); then
        echo "kafka: already running, $have node(s), bootstrap $(bootstrap_for "$have")"
        return 0
      fi
      ensure_jars
      t0=$(now)
      echo "kafka: starting stopped node(s) ${missing[*]} of $have"
      for n in "${missing[@]}"; do check_ports_free "$n"; launch_node "$n"; done
      wait_ready "$t0" $(seq 1 "$have") || die "start of node(s) ${missing[*]} failed"
      echo "kafka: $have node(s) ready in $(elapsed "$t0")s, bootstrap $(bootstrap_for "$have")"
      return 0
    fi
    # state left from a run that is gone (crash, reboot): start afresh
    rm -rf "$STATE"
  fi
  ensure_jars
  command -v "$JAVA" >/dev/null || die "java not found"
  t0=$(now)
  check_ports_free $(seq 1 "$count")
  rm -rf "$STATE"
  mkdir -p "$STATE" "$LOGS"
  write_log4j
  cid=$(cluster_id)
  local pids=()
  for ((n = 1; n <= count; n++)); do
    write_config "$n" "$count"
    format_node "$n" "$cid" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || die "storage format failed (see above)"; done
  echo "$count" >"$STATE/nodes"
  echo "$cid" >"$STATE/cluster-id"
  for ((n = 1; n <= count; n++)); do launch_node "$n"; done
  if ! wait_ready "$t0" $(seq 1 "$count"); then
    # leave no half-started cluster behind (logs stay)
    local left=()
    for ((n = 1; n <= count; n++)); do pid=$(node_pid "$n") && left+=("$pid"); done
    STOP_TIMEOUT=5 stop_pids TERM "${left[@]}"
    rm -rf "$STATE"
    die "start failed; stopped what had started"
  fi
  echo "kafka: $VERSION, $count node(s) ready in $(elapsed "$t0")s, bootstrap $(bootstrap_for "$count"), logs $LOGS/kafka-node-*/"
}

cmd_stop() {
  local have n pid pids=() t0
  lock
  t0=$(now)
  have=$(configured_nodes)
  for ((n = 1; n <= ${have:-0}; n++)); do pid=$(node_pid "$n") && pids+=("$pid"); done
  if ((${#pids[@]} == 0)) && [[ ! -d $STATE ]]; then
    echo "kafka: not running"
    return 0
  fi
  if ((${#pids[@]} > 0 && ${#pids[@]} < ${have:-0} / 2 + 1)); then
    # quorum already lost: a graceful broker shutdown cannot finish, and the data goes anyway
    STOP_TIMEOUT=5 stop_pids TERM "${pids[@]}"
  else
    stop_pids TERM "${pids[@]}"
  fi
  rm -rf "$STATE"
  echo "kafka: stopped ${#pids[@]} node(s) in $(elapsed "$t0")s, data removed, logs kept in $LOGS"
}

cmd_status() {
  local have n up=() down=()
  have=$(configured_nodes)
  if [[ -z $have ]]; then echo "kafka: not running"; return 3; fi
  for ((n = 1; n <= have; n++)); do
    if pid=$(node_pid "$n"); then up+=("$n(pid $pid, $HOST:$(broker_port "$n"))"); else down+=("$n"); fi
  done
  echo "kafka: $have node(s) configured; running: ${up[*]:-none}; stopped: ${down[*]:-none}"
  ((${#up[@]} == 0)) && return 3
  ((${#down[@]} == 0)) && return 0
  return 1
}

valid_node() { # valid_node N
  local have
  have=$(configured_nodes)
  [[ -n $have ]] || die "not started: run '$0 start --nodes 3' first"
  [[ $1 =~ ^[0-9]+$ ]] && (($1 >= 1 && $1 <= have)) || die "node must be 1..$have, got '$1'"
}

cmd_stop_node() { # cmd_stop_node N SIGNAL
  local n=$1 sig=$2 pid t0
  lock
  valid_node "$n"
  t0=$(now)
  if ! pid=$(node_pid "$n"); then echo "kafka: node $n not running"; return 0; fi
  stop_pids "$sig" "$pid"
  echo "kafka: node $n stopped (SIG$sig) in $(elapsed "$t0")s, data kept"
}

cmd_start_node() {
  local n=$1 t0 have m running=()
  lock
  valid_node "$n"
  have=$(configured_nodes)
  if node_pid "$n" >/dev/null; then echo "kafka: node $n already running"; return 0; fi
  ensure_jars
  t0=$(now)
  check_ports_free "$n"
  launch_node "$n"
  for ((m = 1; m <= have; m++)); do node_pid "$m" >/dev/null && running+=("$m"); done
  wait_ready "$t0" "${running[@]}" || die "start of node $n failed"
  echo "kafka: node $n ready in $(elapsed "$t0")s"
}

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

parse_nodes() { # sets NODES, NODES_GIVEN from --nodes N / --nodes=N
  NODES=${CLOSEDLOOP_KAFKA_NODES:-1}
  NODES_GIVEN=
  while (($#)); do
    case $1 in
      --nodes) NODES=${2:-}; NODES_GIVEN=1; shift 2 || shift ;;
      --nodes=*) NODES=${1#--nodes=}; NODES_GIVEN=1; shift ;;
      *) die "unknown argument: $1" ;;
    esac
  done
  [[ $NODES == 1 || $NODES == 3 ]] || die "--nodes must be 1 or 3, got '$NODES'"
}

cmd=${1:-}
shift || true
case $cmd in
  start) parse_nodes "$@"; cmd_start "$NODES" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  bootstrap)
    have=$(configured_nodes)
    if [[ -n $have && $# -eq 0 ]]; then bootstrap_for "$have"; else parse_nodes "$@"; bootstrap_for "$NODES"; fi
    ;;
  stop-node)
    [[ $# -ge 1 ]] || usage
    sig=TERM
    [[ ${2:-} == --kill ]] && sig=KILL
    cmd_stop_node "$1" "$sig"
    ;;
  start-node) [[ $# -eq 1 ]] || usage; cmd_start_node "$1" ;;
  *) usage ;;
esac
