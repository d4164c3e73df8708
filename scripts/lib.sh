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
