#!/usr/bin/env bash
# Start the node services infra's tests and demo need: `docker`, `redis`, `sshd` (any subset).
#
#   bash scripts/start-services.sh docker redis sshd
#
# Idempotent: a service already answering is left alone. Quiet unless something fails; a failure
# prints the tail of that service's log and exits non-zero. Needs root (or sudo-less root in CI).
# Logs go to ${INFRA_SERVICE_LOG_DIR:-/var/log/infra-services}.
set -euo pipefail

LOG_DIR=${INFRA_SERVICE_LOG_DIR:-/var/log/infra-services}
DOCKER_SOCK=/var/run/docker.sock
mkdir -p "$LOG_DIR"

die() {
    echo "start-services: $*" >&2
    exit 1
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

docker_up() {
    # /usr/bin/docker is Debian's 20.10 CLI; any CLI can answer a ping through the socket.
    [ -S "$DOCKER_SOCK" ] && curl -sf --unix-socket "$DOCKER_SOCK" http://localhost/_ping >/dev/null 2>&1
}

start_docker() {
    docker_up && return 0
    command -v dockerd >/dev/null || die "dockerd not found: install it with 'apt-get install -y docker.io'"
    # A dockerd killed with the session leaves its pid file (and socket) behind; the next dockerd
    # refuses to start while the pid file exists.
    local pidfile=/var/run/docker.pid
    if [ -f "$pidfile" ] && ! kill -0 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null; then
        rm -f "$pidfile"
    fi
    local cpid=/run/docker/containerd/containerd.pid
    if [ -f "$cpid" ] && ! kill -0 "$(cat "$cpid" 2>/dev/null)" 2>/dev/null; then
        rm -f "$cpid"
    fi
    [ -S "$DOCKER_SOCK" ] && ! pgrep -x dockerd >/dev/null && rm -f "$DOCKER_SOCK"
    if ! pgrep -x dockerd >/dev/null; then
        nohup dockerd >>"$LOG_DIR/dockerd.log" 2>&1 &
    fi
    if ! wait_for 60 docker docker_up; then
        tail -n 30 "$LOG_DIR/dockerd.log" >&2 || true
        die "dockerd did not answer on $DOCKER_SOCK within 60 s (log: $LOG_DIR/dockerd.log)"
    fi
}

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

start_redis() {
    redis_up && return 0
    command -v redis-server >/dev/null || die "redis-server not found: install it with 'apt-get install -y redis-server'"
    redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save '' --appendonly no \
        --logfile "$LOG_DIR/redis.log" >/dev/null
    if ! wait_for 15 redis redis_up; then
        tail -n 30 "$LOG_DIR/redis.log" >&2 || true
        die "redis-server did not answer on 127.0.0.1:6379 within 15 s"
    fi
}

sshd_up() { (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null; }

start_sshd() {
    sshd_up && return 0
    [ -x /usr/sbin/sshd ] || die "sshd not found: install it with 'apt-get install -y openssh-server'"
    mkdir -p /run/sshd && chmod 0755 /run/sshd # privilege-separation directory
    ssh-keygen -A >/dev/null 2>&1 || true     # host keys, when the package did not make them
    /usr/sbin/sshd -o ListenAddress=127.0.0.1 -E "$LOG_DIR/sshd.log"
    if ! wait_for 15 sshd sshd_up; then
        tail -n 30 "$LOG_DIR/sshd.log" >&2 || true
        die "sshd did not listen on 127.0.0.1:22 within 15 s"
    fi
}

[ $# -gt 0 ] || die "usage: $0 [docker] [redis] [sshd]"
for service in "$@"; do
    case "$service" in
    docker) start_docker ;;
    redis | redis-server) start_redis ;;
    sshd | ssh) start_sshd ;;
    *) die "unknown service '$service' (expected docker, redis or sshd)" ;;
    esac
done
