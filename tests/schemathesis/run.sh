#!/usr/bin/env bash
# Property-based API checks with Schemathesis, against a real Highwater server.
#
#   tests/schemathesis/run.sh            # uses target/debug/highwater (cargo build first)
#   HIGHWATER_BIN=path/to/highwater tests/schemathesis/run.sh
#   SCHEMATHESIS_MAX_EXAMPLES=200 tests/schemathesis/run.sh
#
# Two runs, each pass against a fresh server on a fresh SQLite file:
#   1. the document Highwater serves (GET /api/v1/openapi): every status and
#      body it documents must be what it answers;
#   2. Airbyte's own description, spec/airbyte-state.yaml: Highwater must
#      be a drop-in for it.
# Both with base URL http://127.0.0.1:PORT/api. Exits non-zero if either run
# fails; the last line is always `schemathesis: N passed, M failed` (runs).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${HIGHWATER_BIN:-$ROOT/target/debug/highwater}"
[[ "$BIN" == /* ]] || BIN="$PWD/$BIN"
cd "$ROOT"
VENV="$ROOT/target/schemathesis/venv"
OUT="$ROOT/target/schemathesis"
MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-50}"
PYTHON="${PYTHON:-python3}"

if [[ ! -x "$BIN" ]]; then
    echo "no server binary at $BIN: run 'cargo build' or set HIGHWATER_BIN" >&2
    exit 2
fi

# A venv of its own, reused while the pinned requirements are unchanged.
mkdir -p "$OUT"
if [[ ! -x "$VENV/bin/schemathesis" ]] || ! cmp -s tests/schemathesis/requirements.txt "$VENV/requirements.txt"; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/schemathesis/requirements.txt
    cp tests/schemathesis/requirements.txt "$VENV/requirements.txt"
fi
ST="$VENV/bin/schemathesis"

TMP="$(mktemp -d)"
SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
cleanup() {
    stop_server
    rm -rf "$TMP"
}
trap cleanup EXIT

# Starts a server on a free port over a fresh database; sets PORT.
start_server() {
    local name="$1"
    PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    mkdir -p "$TMP/$name"
    "$BIN" serve --listen "127.0.0.1:$PORT" --database-url "sqlite://$TMP/$name/hw.db" \
        >"$OUT/$name-server.log" 2>&1 &
    SERVER_PID=$!
    local tries=0
    until curl -fsS "http://127.0.0.1:$PORT/api/v1/health" >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [[ $tries -ge 100 ]] || ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "the server did not become healthy within 10 s; its log:" >&2
            cat "$OUT/$name-server.log" >&2
            exit 2
        fi
        sleep 0.1
    done
}

PASSED=0
FAILED=0

# schemathesis_pass NAME LOCATION CHECKS [EXTRA ARGS...]: one invocation
# against a fresh server; "{PORT}" in LOCATION becomes the server's port.
# Returns schemathesis's exit status.
schemathesis_pass() {
    local name="$1" location="$2" checks="$3"
    shift 3
    start_server "$name"
    location="${location//\{PORT\}/$PORT}"
    echo "== schemathesis '$name': $location (checks: $checks)"
    local status=0
    # From $OUT, where schemathesis keeps its cache (.schemathesis/).
    (cd "$OUT" && "$ST" run "$location" \
        --url "http://127.0.0.1:$PORT/api" \
        --checks "$checks" \
        --max-examples "$MAX_EXAMPLES" \
        --seed 20240601 \
        --workers 1 \
        --generation-database none \
        --request-timeout 30 \
        --report junit --report-junit-path "$OUT/$name-junit.xml" \
        --no-color \
        "$@") || status=$?
    stop_server
    if [[ $status -ne 0 ]]; then
        echo "== '$name' failed (exit $status); server log: $OUT/$name-server.log"
    fi
    return $status
}

count() {
    if "$@"; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi
}

# Run 1: the document the server itself serves. It documents every status
# Highwater answers and its blobs are any JSON value, so every response,
# to valid and invalid requests alike, must match it exactly.
count schemathesis_pass served "http://127.0.0.1:{PORT}/api/v1/openapi" \
    not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance

# Run 2: Airbyte's own file, in two passes on fresh servers; the run fails
# if either does.
#  - Airbyte's file declares only 200/404/422 (and 423 for the safe write).
#    Highwater also answers 400 (not JSON), 409 (type change), 413 and 415,
#    deliberately (STATE-API.md §4, §8), so status_code_conformance is left
#    out; response_schema_conformance only judges statuses the file declares.
#  - Airbyte's file types every blob (StateBlob) as an object, while blobs
#    are any JSON value (STATE-API.md §2-3; Airbyte's server also reads them
#    as a JsonNode) and come back as written. A negative-mode request that
#    writes `[null,null]` as a blob is accepted, and every later read of
#    that connection then "violates" StateBlob. So response conformance is
#    checked on positive data only (what Airbyte's file allows), and the
#    negative data is checked for server errors only.
airbyte_run() {
    local status=0
    schemathesis_pass airbyte-positive "$ROOT/spec/airbyte-state.yaml" \
        not_a_server_error,content_type_conformance,response_schema_conformance --mode positive || status=1
    schemathesis_pass airbyte-negative "$ROOT/spec/airbyte-state.yaml" not_a_server_error --mode negative || status=1
    return $status
}
count airbyte_run

echo "schemathesis: $PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
