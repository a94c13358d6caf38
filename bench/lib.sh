# Helpers shared by bench/run, bench/profile and bench/compare, which set
# BENCH_NAME (the log prefix) and then source this file.

log() { printf '[%s %s] %s\n' "$BENCH_NAME" "$(date +%T)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# pg_drop SERVER_URL DATABASE: drops a scratch database, even with sessions
# left on it; fails quietly (the status tells).
pg_drop() { psql "$1/postgres" -Atqc "DROP DATABASE IF EXISTS $2 WITH (FORCE)" >/dev/null 2>&1; }

# wait_http PORT PID LOG [SECONDS]: until GET /api/v1/health on PORT answers
# 200; dies, pointing at the server's LOG, if PID exits or SECONDS (60) pass.
wait_http() {
    local deadline=$((SECONDS + ${4:-60}))
    until curl -fs -o /dev/null "http://127.0.0.1:$1/api/v1/health"; do
        kill -0 "$2" 2>/dev/null || die "the server on port $1 exited; see $3"
        ((SECONDS < deadline)) || die "the server on port $1 did not answer within ${4:-60} s; see $3"
        sleep 0.05
    done
}
