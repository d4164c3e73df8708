# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables are used by the scripts that source this file
# Shared settings and helpers for scripts/up, down, status, test and env.
# Sourced, never run. Every setting can be overridden from the environment.

KEEL_SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KEEL_ROOT="$(cd "$KEEL_SCRIPTS/.." && pwd)"

: "${KEEL_CACHE:=${HOME:-/root}/.cache/keel}"
: "${KEEL_RUN_DIR:=$KEEL_CACHE/run}"
KEEL_LOG_DIR="$KEEL_RUN_DIR/logs"

: "${KEEL_HOST:=127.0.0.1}"
: "${KEEL_KAFKA_PORT:=9092}"
: "${KEEL_KAFKA_CONTROLLER_PORT:=9093}"
: "${KEEL_KAFKA_HEAP:=512m}"
# The three-broker cluster (scripts/up --cluster): brokers on BASE, BASE+1, BASE+2,
# controllers on CONTROLLER_BASE, +1, +2.
: "${KEEL_KAFKA_CLUSTER:=}"
: "${KEEL_KAFKA_CLUSTER_PORT_BASE:=19092}"
: "${KEEL_KAFKA_CLUSTER_CONTROLLER_PORT_BASE:=19192}"
: "${KEEL_S3FS_PORT:=8014}"
: "${KEEL_S3FS_ACCESS_KEY:=keeltest}"
: "${KEEL_S3FS_SECRET_KEY:=keeltestsecret}"
: "${KEEL_MOTO_PORT:=5055}"
# How long each server may take to answer after it was started.
: "${KEEL_UP_TIMEOUT:=120}"

: "${KEEL_KAFKA_LIBS:=$KEEL_CACHE/kafka/libs}"
: "${KEEL_KCAT:=kcat}"
KEEL_S3FS_BIN="$KEEL_CACHE/s3s-fs/bin/s3s-fs"
KEEL_VENV="$KEEL_CACHE/venv"

# Pinned versions: s3s-fs here, Kafka and log4j in scripts/kafka/pom.xml, moto and
# boto3 in scripts/moto-requirements.txt.
KEEL_S3FS_VERSION=0.14.1

KEEL_KAFKA_BROKERS="$KEEL_HOST:$KEEL_KAFKA_PORT"
KEEL_S3FS_ENDPOINT="http://$KEEL_HOST:$KEEL_S3FS_PORT"
KEEL_MOTO_ENDPOINT="http://$KEEL_HOST:$KEEL_MOTO_PORT"
KEEL_KAFKA_CLUSTER_BROKERS="$KEEL_HOST:$KEEL_KAFKA_CLUSTER_PORT_BASE,$KEEL_HOST:$((KEEL_KAFKA_CLUSTER_PORT_BASE + 1)),$KEEL_HOST:$((KEEL_KAFKA_CLUSTER_PORT_BASE + 2))"

# Every server scripts/up may start, as NAME:TEXT, where TEXT is a part of its command
# line that tells it from any other process (pid files are $KEEL_RUN_DIR/NAME.pid).
KEEL_SERVERS=(
	"kafka:$KEEL_RUN_DIR/kafka/server.properties"
	"kafka-cluster-1:$KEEL_RUN_DIR/kafka-cluster-1/server.properties"
	"kafka-cluster-2:$KEEL_RUN_DIR/kafka-cluster-2/server.properties"
	"kafka-cluster-3:$KEEL_RUN_DIR/kafka-cluster-3/server.properties"
	"s3s-fs:$KEEL_RUN_DIR/s3s-fs/data"
	"moto:$KEEL_VENV/bin/moto_server"
)

# The command-line text of server NAME (see KEEL_SERVERS).
server_match() {
	local entry
	for entry in "${KEEL_SERVERS[@]}"; do
		if [[ ${entry%%:*} == "$1" ]]; then
			echo "${entry#*:}"
			return 0
		fi
	done
	die "unknown server $1"
}

# The pid of server NAME if scripts/up started it and it still runs; nothing otherwise.
running() {
	live_pid "$1" "$(server_match "$1")"
}

# The topic and bucket that readiness checks create.
KEEL_CHECK_TOPIC=keel-up-check
KEEL_CHECK_BUCKET=keel-up-check

say() { printf '[keel %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() {
	printf '[keel %s] ERROR: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2
	exit 1
}

# Prints the variables the tests read (tests/support/mod.rs), as export lines.
keel_env_exports() {
	local name
	for name in KEEL_CACHE KEEL_RUN_DIR KEEL_KAFKA_BROKERS KEEL_KAFKA_CLUSTER_BROKERS \
		KEEL_S3FS_ENDPOINT KEEL_S3FS_ACCESS_KEY KEEL_S3FS_SECRET_KEY KEEL_MOTO_ENDPOINT \
		KEEL_KCAT KEEL_KAFKA_LIBS; do
		if [[ ${!name} == *\'* ]]; then
			printf 'export %s=%q\n' "$name" "${!name}"
		else
			printf "export %s='%s'\n" "$name" "${!name}"
		fi
	done
}

# True when something accepts TCP connections on host $1 port $2.
port_open() {
	(exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# The pid recorded in $KEEL_RUN_DIR/$1.pid if that process still runs the command
# that up started (its command line contains $2); nothing otherwise.
live_pid() {
	local file="$KEEL_RUN_DIR/$1.pid" pid
	[[ -f $file ]] || return 0
	pid="$(cat "$file" 2>/dev/null || true)"
	[[ $pid =~ ^[0-9]+$ ]] || return 0
	[[ -r /proc/$pid/cmdline ]] || return 0
	local cmdline="" try
	# While a process is inside execve (the daemon's shell becoming the server) or
	# is a zombie not yet reaped, its cmdline reads empty: read again before
	# deciding, so a server that is starting is never taken for one that exited.
	for try in 1 2 3 4 5; do
		cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
		[[ -z $cmdline ]] || break
		[[ -d /proc/$pid ]] || return 0
		sleep 0.1
	done
	if [[ -z $cmdline ]]; then
		# Still empty: a zombie (exited) or a process in exec; only a live one counts.
		local state
		state="$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1 || true)"
		if [[ -n $state && $state != Z ]]; then
			echo "$pid"
		fi
		return 0
	fi
	if grep -qF -- "$2" <<<"$cmdline"; then
		echo "$pid"
	fi
}

# The last lines of a log file, indented, for error messages.
log_tail() {
	if [[ -f $1 ]]; then
		echo "--- last lines of $1:"
		tail -n "${2:-20}" "$1" | sed 's/^/    /'
	fi
}

# Stops the named servers if up started them and they run, and removes their pid
# files and data; sets STOPPED_COUNT. TERM first, KILL after 10 s: a lone Kafka
# node stops in a second or two, but the last nodes of a cluster that stops as a
# whole wait for a controller quorum that is gone, and the data goes anyway.
stop_servers() {
	local name pid deadline count=0
	local -A stopping=()
	for name in "$@"; do
		pid="$(running "$name")"
		if [[ -n $pid ]]; then
			say "stopping $name (pid $pid)"
			kill -TERM "$pid" 2>/dev/null || true
			stopping[$name]=$pid
			count=$((count + 1))
		fi
	done
	deadline=$((SECONDS + 10))
	for name in "${!stopping[@]}"; do
		pid=${stopping[$name]}
		while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
			sleep 0.2
		done
		if kill -0 "$pid" 2>/dev/null; then
			say "$name (pid $pid) did not stop in time; killing it"
			kill -KILL "$pid" 2>/dev/null || true
		fi
	done
	for name in "$@"; do
		rm -f "$KEEL_RUN_DIR/$name.pid"
		rm -rf "${KEEL_RUN_DIR:?}/$name"
	done
	STOPPED_COUNT=$count
}

kafka_java() {
	java -cp "$KEEL_KAFKA_LIBS/*" "$@"
}

# Runs the venv's python with the S3 readiness check: create and list a bucket.
s3_check() {
	"$KEEL_VENV/bin/python" "$KEEL_SCRIPTS/s3_check.py" "$@"
}

# Takes the lock that makes `up`, `down`, `kafka-start` and `kafka-kill` of one run
# directory take turns (helpers may call them together); held on fd 9 until exit.
take_run_lock() {
	mkdir -p "$KEEL_LOG_DIR"
	exec 9>"$KEEL_RUN_DIR/.lock"
	flock -w "${1:-900}" 9 || die "another scripts/up, down, kafka-start or kafka-kill holds $KEEL_RUN_DIR/.lock"
}

# ---------------------------------------------------------------- starting servers

# start_daemon NAME LOG CMD...: runs CMD detached, its pid in $KEEL_RUN_DIR/NAME.pid.
start_daemon() {
	local name=$1 log=$2
	shift 2
	# A pid file left by a server that died (or by a copied cache) would be taken
	# for the new one's before the new shell writes it: remove it first.
	rm -f "$KEEL_RUN_DIR/$name.pid"
	# The daemon must not keep the lock (fd 9) open.
	# shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
	setsid bash -c 'echo $$ >"$0"; exec "$@"' "$KEEL_RUN_DIR/$name.pid" "$@" \
		>>"$log" 2>&1 </dev/null 9>&- &
	disown || true
	local i
	for i in $(seq 50); do
		[[ -s $KEEL_RUN_DIR/$name.pid ]] && return 0
		sleep 0.1
	done
	die "$name did not start; $(log_tail "$log")"
}

# Fails unless the port is free (so that we never mistake a stranger for our server).
require_free_port() {
	if port_open "$KEEL_HOST" "$2"; then
		die "$1: port $KEEL_HOST:$2 is taken by a process that scripts/up did not start (pid files in $KEEL_RUN_DIR); stop it or choose other ports (see scripts/README.md)"
	fi
}

# A KRaft cluster id: a random UUID, base64url without padding (what
# `kafka-storage random-uuid` prints), made without starting a JVM.
new_cluster_id() {
	python3 -c 'import base64, uuid
while True:
    i = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not i.startswith("-"):
        print(i)
        break'
}

# ---------------------------------------------------------------- Kafka nodes
#
# A Kafka node NAME (kafka, kafka-cluster-1..3) keeps its configuration and data in
# $KEEL_RUN_DIR/NAME: server.properties and data/ (formatted: data/meta.properties).
# A node that is down but formatted (killed, crashed, machine restarted) starts
# again on its own data, with the configuration it was formatted with; only
# `scripts/down` removes the data.

KEEL_KAFKA_NODES=(kafka kafka-cluster-1 kafka-cluster-2 kafka-cluster-3)

# True when NAME is one of KEEL_KAFKA_NODES.
is_kafka_node() {
	local n
	for n in "${KEEL_KAFKA_NODES[@]}"; do
		[[ $n == "$1" ]] && return 0
	done
	return 1
}

# True when node NAME has formatted data (it can start again on it).
kafka_formatted() {
	[[ -f $KEEL_RUN_DIR/$1/data/meta.properties && -f $KEEL_RUN_DIR/$1/server.properties ]]
}

# kafka_prop NAME KEY: a value of node NAME's server.properties.
kafka_prop() {
	sed -n "s|^$2=||p" "$KEEL_RUN_DIR/$1/server.properties" | head -n 1
}

# The broker port of node NAME: from its configuration when it has one (so that a
# restart needs no environment but KEEL_RUN_DIR), from the settings otherwise.
kafka_node_port() {
	if [[ -f $KEEL_RUN_DIR/$1/server.properties ]]; then
		kafka_prop "$1" listeners | sed -E 's|^PLAINTEXT://[^,]*:([0-9]+),.*$|\1|'
	else
		kafka_node_spec "$1"
		echo "$KAFKA_SPEC_PORT"
	fi
}

# The number of nodes of NAME's cluster (1 or 3), from its configuration.
kafka_node_count() {
	kafka_prop "$1" controller.quorum.voters | tr ',' '\n' | grep -c .
}

# The cluster id node NAME was formatted with.
kafka_cluster_id() {
	sed -n 's/^cluster.id=//p' "$KEEL_RUN_DIR/$1/data/meta.properties"
}

# kafka_node_spec NAME: sets KAFKA_SPEC_{ID,PORT,CPORT,VOTERS,REPLICATION,MIN_ISR}
# for a node that is formatted anew, from the settings (scripts/lib.sh).
kafka_node_spec() {
	local n
	case $1 in
	kafka)
		KAFKA_SPEC_ID=1
		KAFKA_SPEC_PORT=$KEEL_KAFKA_PORT
		KAFKA_SPEC_CPORT=$KEEL_KAFKA_CONTROLLER_PORT
		KAFKA_SPEC_VOTERS="1@$KEEL_HOST:$KEEL_KAFKA_CONTROLLER_PORT"
		KAFKA_SPEC_REPLICATION=1
		KAFKA_SPEC_MIN_ISR=1
		;;
	kafka-cluster-[123])
		n=${1#kafka-cluster-}
		KAFKA_SPEC_ID=$n
		KAFKA_SPEC_PORT=$((KEEL_KAFKA_CLUSTER_PORT_BASE + n - 1))
		KAFKA_SPEC_CPORT=$((KEEL_KAFKA_CLUSTER_CONTROLLER_PORT_BASE + n - 1))
		KAFKA_SPEC_VOTERS=""
		for n in 1 2 3; do
			KAFKA_SPEC_VOTERS+="${KAFKA_SPEC_VOTERS:+,}$n@$KEEL_HOST:$((KEEL_KAFKA_CLUSTER_CONTROLLER_PORT_BASE + n - 1))"
		done
		KAFKA_SPEC_REPLICATION=3
		KAFKA_SPEC_MIN_ISR=2
		;;
	*) die "unknown Kafka node $1 (one of: ${KEEL_KAFKA_NODES[*]})" ;;
	esac
}

# start_kafka_node NAME [CLUSTER_ID]: starts node NAME unless it runs. A formatted
# node starts on its own data; any other is configured from the settings and
# formatted with CLUSTER_ID (a new one when empty). Does not wait: see wait_kafka_node.
start_kafka_node() {
	local name=$1 cluster_id=${2:-}
	local dir="$KEEL_RUN_DIR/$name" log="$KEEL_LOG_DIR/$name.log"
	local props="$dir/server.properties" pid port cport
	pid="$(running "$name")"
	if [[ -n $pid ]]; then
		say "$name already runs (pid $pid)"
		return 0
	fi
	mkdir -p "$KEEL_LOG_DIR"
	if kafka_formatted "$name"; then
		port="$(kafka_node_port "$name")"
		cport="$(kafka_prop "$name" listeners | sed -E 's|^.*CONTROLLER://[^,]*:([0-9]+).*$|\1|')"
		kafka_node_spec "$name"
		if [[ $port != "$KAFKA_SPEC_PORT" ]]; then
			say "note: $name keeps port $port it was formatted with (the settings say $KAFKA_SPEC_PORT; scripts/down $name wipes it)"
		fi
		require_free_port "$name" "$port"
		require_free_port "$name controller" "$cport"
		say "starting $name again on its own data (cluster $(kafka_cluster_id "$name")) on $KEEL_HOST:$port, log $log"
	else
		kafka_node_spec "$name"
		port=$KAFKA_SPEC_PORT
		require_free_port "$name" "$port"
		require_free_port "$name controller" "$KAFKA_SPEC_CPORT"
		[[ -n $cluster_id ]] || cluster_id="$(new_cluster_id)"
		rm -rf "$dir"
		mkdir -p "$dir/data"
		sed -e "s|@NODE_ID@|$KAFKA_SPEC_ID|g" -e "s|@VOTERS@|$KAFKA_SPEC_VOTERS|g" \
			-e "s|@HOST@|$KEEL_HOST|g" -e "s|@PORT@|$port|g" \
			-e "s|@CONTROLLER_PORT@|$KAFKA_SPEC_CPORT|g" -e "s|@DATA_DIR@|$dir/data|g" \
			-e "s|@REPLICATION@|$KAFKA_SPEC_REPLICATION|g" -e "s|@MIN_ISR@|$KAFKA_SPEC_MIN_ISR|g" \
			"$KEEL_SCRIPTS/kafka/server.properties.in" >"$props"
		kafka_java -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
			-Dlog4j2.configurationFile="$KEEL_SCRIPTS/kafka/log4j2-tools.properties" \
			kafka.tools.StorageTool format -t "$cluster_id" -c "$props" \
			>"$KEEL_LOG_DIR/$name-format.log" 2>&1 </dev/null ||
			die "formatting $name failed; $(log_tail "$KEEL_LOG_DIR/$name-format.log")"
		# A fresh node gets a fresh log; a restarted one appends to its old one.
		: >"$log"
		say "starting $name: node $KAFKA_SPEC_ID on $KEEL_HOST:$port (controller $KAFKA_SPEC_CPORT), log $log"
	fi
	echo "[keel $(date -u +%H:%M:%S)] --- started by scripts ---" >>"$log"
	start_daemon "$name" "$log" java "-Xmx$KEEL_KAFKA_HEAP" -XX:+UseG1GC \
		-Djava.awt.headless=true \
		-Dlog4j2.configurationFile="$KEEL_SCRIPTS/kafka/log4j2.properties" \
		-cp "$KEEL_KAFKA_LIBS/*" kafka.Kafka "$props"
}

# start_kafka_cluster: starts the three-node cluster's nodes that do not run: on
# their own data when formatted; a node without data is formatted with the id of
# the nodes that have some (it joins them), or all three with a new id.
start_kafka_cluster() {
	local n id=""
	for n in 1 2 3; do
		if kafka_formatted "kafka-cluster-$n"; then
			id="$(kafka_cluster_id "kafka-cluster-$n")"
			break
		fi
	done
	[[ -n $id ]] || id="$(new_cluster_id)"
	for n in 1 2 3; do
		start_kafka_node "kafka-cluster-$n" "$id"
	done
}

# kill_kafka_node NAME: SIGKILL, as a crash: no shutdown, no flush; the data stays.
# Returns once the process is gone.
kill_kafka_node() {
	local name=$1 pid deadline
	pid="$(running "$name")"
	[[ -n $pid ]] || die "$name does not run (scripts/status)"
	kill -KILL "$pid" 2>/dev/null || true
	deadline=$((SECONDS + 10))
	while [[ -n $(running "$name") ]]; do
		((SECONDS < deadline)) || die "$name (pid $pid) still runs 10 s after SIGKILL"
		sleep 0.05
	done
	rm -f "$KEEL_RUN_DIR/$name.pid"
	echo "[keel $(date -u +%H:%M:%S)] --- killed (SIGKILL) by scripts/kafka-kill ---" >>"$KEEL_LOG_DIR/$name.log"
	say "$name (pid $pid) killed with SIGKILL; its data stays in $KEEL_RUN_DIR/$name"
}

# ---------------------------------------------------------------- readiness

# wait_port NAME SERVER PORT LOG DEADLINE: until SERVER (a KEEL_SERVERS name) listens.
wait_port() {
	local name=$1 server=$2 port=$3 log=$4 deadline=$5
	until port_open "$KEEL_HOST" "$port"; do
		[[ -n $(running "$server") ]] ||
			die "$name exited before it answered on $KEEL_HOST:$port; $(log_tail "$log" 30)"
		((SECONDS < deadline)) ||
			die "$name did not open $KEEL_HOST:$port within ${KEEL_UP_TIMEOUT}s; $(log_tail "$log" 30)"
		sleep 0.2
	done
}

# Kafka answers when a topic can be created (the metadata request itself asks the
# broker to create it) and has a leader with all its replicas in sync, and every
# broker of the cluster is listed.
# wait_kafka NAME BOOTSTRAP BROKERS REPLICATION SERVER PORT (SERVER: the node asked)
wait_kafka() {
	local name=$1 bootstrap=$2 brokers=$3 replication=$4 server=$5 port=$6
	local log="$KEEL_LOG_DIR/$server.log"
	local deadline=$((SECONDS + KEEL_UP_TIMEOUT)) meta="" ids
	ids="([0-9]+,){$((replication - 1))}[0-9]+"
	wait_port "$name" "$server" "$port" "$log" "$deadline"
	while :; do
		meta="$("$KEEL_KCAT" -b "$bootstrap" -L -t "$KEEL_CHECK_TOPIC" -m 5 \
			-X allow.auto.create.topics=true 2>&1 || true)"
		if grep -q "^ *$brokers brokers:" <<<"$meta" &&
			grep -Eq "partition 0, leader [0-9]+, replicas: $ids, isrs: $ids\$" <<<"$meta"; then
			break
		fi
		[[ -n $(running "$server") ]] ||
			die "$name exited before it answered; $(log_tail "$log" 30)"
		((SECONDS < deadline)) ||
			die "$name does not give metadata for topic $KEEL_CHECK_TOPIC within ${KEEL_UP_TIMEOUT}s; last answer:
$meta
$(log_tail "$log" 30)"
		sleep 0.3
	done
	say "$name answers on $bootstrap: topic $KEEL_CHECK_TOPIC created, has a leader ($brokers broker(s))"
}

# wait_kafka_node NAME: until node NAME answers on its own port, its cluster lists
# all its brokers and the check topic has every replica in sync (a restarted node
# has caught up on it).
wait_kafka_node() {
	local name=$1 port count
	port="$(kafka_node_port "$name")"
	count="$(kafka_node_count "$name")"
	wait_kafka "$name" "$KEEL_HOST:$port" "$count" "$count" "$name" "$port"
}
