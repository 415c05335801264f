#!/usr/bin/env bash
# Throwaway PostgreSQL + Redis on loopback for the scale-out tests and benchmarks.
#
#   eval "$(scripts/services.sh start)"   # starts both, prints export lines
#   scripts/services.sh stop              # stops both, deletes their data
#
# `start` prints DATABASE_URL, BERTH_REDIS_URL and BERTH_SERVICES_DIR (where the
# data, logs and pids live; `stop` reads it, or takes it as its argument). Both
# listen on 127.0.0.1 only, on free ports, with generated passwords. Durability is
# off (fsync, Redis persistence): the data is thrown away at `stop`.
# Needs Debian's postgresql (15 or later) and redis-server packages. As root, the
# cluster runs as the `postgres` user, as PostgreSQL requires.
set -euo pipefail

die() { echo "services.sh: $*" >&2; exit 1; }

pg_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$dir" ] && [ -x "$dir/initdb" ] || die "PostgreSQL not found (apt-get install postgresql)"
    echo "$dir"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

secret() { head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# Run a PostgreSQL tool as the cluster's owner.
as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
    local dir=$1 bin port password
    bin=$(pg_bin)
    port=$(free_port)
    password=$(secret)
    mkdir -p "$dir/pg" "$dir/pgsock"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir/pg" "$dir/pgsock"
    chmod 700 "$dir/pg" "$dir/pgsock"
    # Local socket: trust, but the socket directory is the owner's alone. TCP: password.
    as_owner "$bin/initdb" -D "$dir/pg/data" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
        || die "initdb failed: $(tail -n 5 "$dir/initdb.log")"
    as_owner "$bin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/server.log" -w -t 60 start -o \
        "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$dir/pgsock \
         -c max_connections=300 -c fsync=off -c synchronous_commit=off \
         -c full_page_writes=off" >/dev/null \
        || die "PostgreSQL did not start: $(tail -n 5 "$dir/pg/server.log" 2>/dev/null)"
    # CREATEDB: pytest-django creates (and drops) test_berth itself.
    as_owner "$bin/psql" -h "$dir/pgsock" -p "$port" -U postgres -q -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE berth LOGIN CREATEDB PASSWORD '$password'" \
        -c "CREATE DATABASE berth OWNER berth" >/dev/null
    echo "$port" >"$dir/pg.port"
    echo "export DATABASE_URL=postgres://berth:$password@127.0.0.1:$port/berth"
}

start_redis() {
    local dir=$1 port password
    port=$(free_port)
    password=$(secret)
    mkdir -p "$dir/redis"
    # The password goes in a 0600 file, not on the command line where ps shows it.
    (umask 077; printf 'requirepass %s\n' "$password" >"$dir/redis/auth.conf")
    redis-server - <<EOF >/dev/null
include $dir/redis/auth.conf
bind 127.0.0.1
port $port
dir $dir/redis
daemonize yes
pidfile $dir/redis/redis.pid
logfile $dir/redis/redis.log
save ""
appendonly no
EOF
    for _ in $(seq 100); do
        REDISCLI_AUTH=$password redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break
        sleep 0.1
    done
    REDISCLI_AUTH=$password redis-cli -p "$port" ping 2>/dev/null | grep -q PONG \
        || die "redis-server did not start: $(tail -n 5 "$dir/redis/redis.log" 2>/dev/null)"
    echo "export BERTH_REDIS_URL=redis://:$password@127.0.0.1:$port/0"
}

start() {
    command -v redis-server >/dev/null || die "redis-server not found (apt-get install redis-server)"
    local dir
    dir=$(mktemp -d "${TMPDIR:-/tmp}/berth-services.XXXXXX")
    chmod 711 "$dir"  # postgres must reach its subdirectories; nothing here is listable
    # Whatever fails half-way, nothing is left running.
    trap 'stop "$dir" >/dev/null 2>&1 || true' EXIT
    start_postgres "$dir"
    start_redis "$dir"
    trap - EXIT
    echo "export BERTH_SERVICES_DIR=$dir"
}

stop() {
    local dir=${1:-${BERTH_SERVICES_DIR:-}}
    [ -n "$dir" ] && [ -d "$dir" ] || die "nothing to stop (give the directory or set BERTH_SERVICES_DIR)"
    [ -f "$dir/redis/auth.conf" ] || [ -d "$dir/pg" ] || die "$dir is not a services directory"
    if [ -f "$dir/redis/redis.pid" ]; then
        local pid
        pid=$(cat "$dir/redis/redis.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    if [ -f "$dir/pg/data/postmaster.pid" ]; then
        as_owner "$(pg_bin)/pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null || true
    fi
    rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    *) die "usage: $0 start | stop [DIR]" ;;
esac
