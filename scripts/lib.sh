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

# Pinned versions (the Kafka and log4j versions live in scripts/kafka/pom.xml).
KEEL_S3FS_VERSION=0.14.1
KEEL_MOTO_VERSION=5.2.5
KEEL_BOTO3_VERSION=1.44.8

KEEL_KAFKA_BROKERS="$KEEL_HOST:$KEEL_KAFKA_PORT"
KEEL_S3FS_ENDPOINT="http://$KEEL_HOST:$KEEL_S3FS_PORT"
KEEL_MOTO_ENDPOINT="http://$KEEL_HOST:$KEEL_MOTO_PORT"
KEEL_KAFKA_CLUSTER_BROKERS="$KEEL_HOST:$KEEL_KAFKA_CLUSTER_PORT_BASE,$KEEL_HOST:$((KEEL_KAFKA_CLUSTER_PORT_BASE + 1)),$KEEL_HOST:$((KEEL_KAFKA_CLUSTER_PORT_BASE + 2))"

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
		printf 'export %s=%q\n' "$name" "${!name}"
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
	if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$2"; then
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

kafka_java() {
	java -cp "$KEEL_KAFKA_LIBS/*" "$@"
}

# Runs the venv's python with the S3 readiness check: create and list a bucket.
s3_check() {
	"$KEEL_VENV/bin/python" "$KEEL_SCRIPTS/s3_check.py" "$@"
}
