# Helpers the benchmark scripts share; sourced (`. "$ROOT/bench/lib.sh"`), after PG_OS_USER
# and before the first use. Each script keeps its own `die` (some record errors for a summary).

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
now() { date +%s.%N; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Postgres refuses to run as root.
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u "$PG_OS_USER" -- "$@"; else "$@"; fi
}

# q PORT DB SQL: one statement, unaligned output, errors fatal.
q() { psql -X -q -At -v ON_ERROR_STOP=1 -p "$1" -d "$2" -c "$3"; }

# Sends a signal to a pid (a child of this shell) and waits up to $2 seconds, then SIGKILL.
stop_pid() {
    local pid="$1" grace="$2" sig="${3:-TERM}" i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -"$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    log "pid $pid did not stop in ${grace}s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# Stops the server in data directory $1 (fast, then immediate, then SIGKILL); run from $WORK.
stop_server() {
    local dir="$1"
    [ -f "$dir/postmaster.pid" ] || return 0
    (cd "$WORK" && as_pg pg_ctl stop -D "$dir" -m fast -w -t 60 >/dev/null 2>&1) ||
        (cd "$WORK" && as_pg pg_ctl stop -D "$dir" -m immediate -w -t 30 >/dev/null 2>&1) ||
        kill -KILL "$(head -1 "$dir/postmaster.pid")" 2>/dev/null || true
}
