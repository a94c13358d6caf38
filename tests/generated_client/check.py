"""Drive a running Highwater with the Python client that openapi-generator makes
from Airbyte's own OpenAPI file (spec/airbyte-state.yaml, unmodified).

Usage: check.py BASE_URL        (e.g. http://127.0.0.1:8080)

Run by tests/generated_client/run.sh, which generates and installs the client
package `airbyte_state_client`. Every check uses fresh connection ids. Prints one
line per check and, last, `generated client: N passed, M failed`; exits 1 when
any check failed.
"""

import json
import sys
import traceback
import uuid

import airbyte_state_client
from airbyte_state_client import (
    ApiClient,
    Configuration,
    ConnectionIdRequestBody,
    ConnectionState,
    ConnectionStateCreateOrUpdate,
    ConnectionStateType,
    GlobalState,
    InvalidInputExceptionInfo,
    KnownExceptionInfo,
    StateApi,
    StreamDescriptor,
    StreamState,
)
from airbyte_state_client.exceptions import ApiException


class CheckFailed(AssertionError):
    pass


def expect(cond, message):
    if not cond:
        raise CheckFailed(message)


def expect_eq(actual, expected, what):
    if actual != expected:
        raise CheckFailed(f"{what}:\n    expected {expected!r}\n    got      {actual!r}")


def new_id():
    return str(uuid.uuid4())


def stream(name, blob=None, namespace=None, *, with_blob=True):
    """A StreamState; with_blob=False leaves streamState out (a delete in a write)."""
    descriptor = StreamDescriptor(name=name, namespace=namespace)
    if with_blob:
        return StreamState(stream_descriptor=descriptor, stream_state=blob)
    return StreamState(stream_descriptor=descriptor)


def write(api, conn_id, state, *, safe=False):
    body = ConnectionStateCreateOrUpdate(connection_id=conn_id, connection_state=state)
    if safe:
        return api.create_or_update_state_safe(body)
    return api.create_or_update_state(body)


def get(api, conn_id):
    return api.get_state(ConnectionIdRequestBody(connection_id=conn_id))


def expect_not_set(result, conn_id, what):
    expect(isinstance(result, ConnectionState), f"{what}: not a ConnectionState: {result!r}")
    expect_eq(result.state_type, ConnectionStateType.NOT_SET, f"{what}: stateType")
    expect_eq(str(result.connection_id), conn_id, f"{what}: connectionId")
    expect(result.state is None, f"{what}: state should be absent, got {result.state!r}")
    expect(result.stream_state is None, f"{what}: streamState should be absent, got {result.stream_state!r}")
    expect(result.global_state is None, f"{what}: globalState should be absent, got {result.global_state!r}")
    expect_eq(result.to_dict(), {"stateType": "not_set", "connectionId": uuid.UUID(conn_id)}, f"{what}: whole body")


def streams_dicts(streams):
    return [s.to_dict() for s in (streams or [])]


# ---------------------------------------------------------------------------
# checks: each takes a StateApi and raises on failure


def check_get_unknown(api):
    conn = new_id()
    expect_not_set(get(api, conn), conn, "get of an unknown connection")
    # The model cannot tell an absent field from a null one; the raw body can.
    raw = api.get_state_with_http_info(ConnectionIdRequestBody(connection_id=conn))
    expect_eq(raw.status_code, 200, "status")
    expect_eq(json.loads(raw.raw_data), {"stateType": "not_set", "connectionId": conn},
              "raw body of get of an unknown connection")


def check_legacy_round_trip(api):
    conn = new_id()
    blob = {"cursor": "2024-01-01", "n": 5}
    state = ConnectionState(state_type=ConnectionStateType.LEGACY, connection_id=conn, state=blob)
    written = write(api, conn, state)
    expect_eq(written.state_type, ConnectionStateType.LEGACY, "write response stateType")
    expect_eq(str(written.connection_id), conn, "write response connectionId")
    expect_eq(written.state, blob, "write response state")
    expect(written.stream_state is None and written.global_state is None,
           f"write response has fields of another type: {written.to_dict()!r}")
    read = get(api, conn)
    expect_eq(read.to_dict(), state.to_dict(), "get after legacy write")
    expect_eq(list(read.state.keys()), ["cursor", "n"], "legacy blob key order")


def check_stream_round_trip(api):
    conn = new_id()
    # Not in alphabetical order: first-insertion order must be kept.
    streams = [
        stream("users", {"updated_at": "2024-02-01T00:00:00Z", "page": 3}, namespace="public"),
        stream("accounts", {"id": 42}),
    ]
    state = ConnectionState(state_type=ConnectionStateType.STREAM, connection_id=conn, stream_state=streams)
    written = write(api, conn, state)
    expect_eq(written.state_type, ConnectionStateType.STREAM, "write response stateType")
    expect_eq(streams_dicts(written.stream_state), streams_dicts(streams), "write response streamState")
    read = get(api, conn)
    expect_eq(read.to_dict(), state.to_dict(), "get after stream write")
    expect_eq([s.stream_descriptor.name for s in read.stream_state], ["users", "accounts"], "stream order")
    expect_eq(read.stream_state[0].stream_descriptor.namespace, "public", "namespace of users")
    expect(read.stream_state[1].stream_descriptor.namespace is None,
           f"accounts should have no namespace, got {read.stream_state[1].stream_descriptor.namespace!r}")


def check_stream_update_and_delete(api):
    conn = new_id()
    first = [stream("users", {"cursor": 1}, namespace="public"), stream("accounts", {"id": 1})]
    write(api, conn, ConnectionState(state_type=ConnectionStateType.STREAM, connection_id=conn, stream_state=first))
    # Update users, delete accounts (an item without streamState).
    second = [stream("users", {"cursor": 2}, namespace="public"), stream("accounts", with_blob=False)]
    expect("streamState" not in second[1].to_dict(),
           f"generated client serialised the delete item as {second[1].to_dict()!r}")
    written = write(api, conn, ConnectionState(state_type=ConnectionStateType.STREAM, connection_id=conn,
                                               stream_state=second))
    expected = [stream("users", {"cursor": 2}, namespace="public").to_dict()]
    expect_eq(written.state_type, ConnectionStateType.STREAM, "write response stateType")
    expect_eq(streams_dicts(written.stream_state), expected, "write response streamState")
    read = get(api, conn)
    expect_eq(read.state_type, ConnectionStateType.STREAM, "get stateType")
    expect_eq(streams_dicts(read.stream_state), expected, "get streamState after update + delete")


def check_global_round_trip(api):
    conn = new_id()
    global_state = GlobalState(
        shared_state={"lsn": 123456789, "txid": "abc"},
        stream_states=[
            stream("orders", {"cursor": "2024-03-01"}, namespace="sales"),
            stream("customers", {"cursor": "2024-03-02"}),
        ],
    )
    state = ConnectionState(state_type=ConnectionStateType.GLOBAL, connection_id=conn, global_state=global_state)
    written = write(api, conn, state)
    expect_eq(written.state_type, ConnectionStateType.GLOBAL, "write response stateType")
    expect_eq(written.global_state.to_dict() if written.global_state else None, global_state.to_dict(),
              "write response globalState")
    expect(written.state is None and written.stream_state is None,
           f"write response has fields of another type: {written.to_dict()!r}")
    raw = api.get_state_with_http_info(ConnectionIdRequestBody(connection_id=conn))
    expect_eq(list(json.loads(raw.raw_data)), ["stateType", "connectionId", "globalState"],
              "members of the raw get body (fields of other types are absent, not null)")
    read = raw.data
    expect_eq(read.to_dict(), state.to_dict(), "get after global write")
    expect_eq(read.global_state.shared_state, {"lsn": 123456789, "txid": "abc"}, "shared_state")
    expect_eq([s.stream_descriptor.name for s in read.global_state.stream_states], ["orders", "customers"],
              "global stream order")


def check_safe_round_trip(api):
    conn = new_id()
    state = ConnectionState(state_type=ConnectionStateType.STREAM, connection_id=conn,
                            stream_state=[stream("events", {"offset": 17}, namespace="kafka")])
    written = write(api, conn, state, safe=True)
    expect_eq(written.to_dict(), state.to_dict(), "create_or_update_safe response")
    expect_eq(get(api, conn).to_dict(), state.to_dict(), "get after create_or_update_safe")


def check_type_change_conflict(api):
    conn = new_id()
    original = ConnectionState(state_type=ConnectionStateType.STREAM, connection_id=conn,
                               stream_state=[stream("users", {"cursor": 1})])
    write(api, conn, original)
    legacy = ConnectionState(state_type=ConnectionStateType.LEGACY, connection_id=conn, state={"cursor": 2})
    try:
        result = write(api, conn, legacy)
    except ApiException as e:
        expect_eq(e.status, 409, f"status of a stream -> legacy write (body {e.body!r})")
        info = KnownExceptionInfo.from_json(e.body)
        expect(bool(info.message), f"409 body has no message: {e.body!r}")
    else:
        raise CheckFailed(f"stream -> legacy write was accepted: {result.to_dict()!r}")
    expect_eq(get(api, conn).to_dict(), original.to_dict(), "state after the refused write")


def check_not_set_write_rejected(api):
    conn = new_id()
    state = ConnectionState(state_type=ConnectionStateType.NOT_SET, connection_id=conn)
    try:
        result = write(api, conn, state)
    except ApiException as e:
        expect_eq(e.status, 422, f"status of a not_set write (body {e.body!r})")
        # 422 is declared in Airbyte's spec, so the client deserialises the body.
        expect(isinstance(e.data, InvalidInputExceptionInfo),
               f"422 body did not deserialise as InvalidInputExceptionInfo: {e.body!r}")
        expect(bool(e.data.message), f"422 body has no message: {e.body!r}")
        expect(len(e.data.validation_errors) >= 1, f"422 body has no validationErrors: {e.body!r}")
    else:
        raise CheckFailed(f"not_set write was accepted: {result.to_dict()!r}")
    expect_not_set(get(api, conn), conn, "get after the rejected write")


def check_bare_host_round_trip(api):
    """Run against the client configured without /api (Highwater serves /v1/... too)."""
    conn = new_id()
    expect_not_set(get(api, conn), conn, "get of an unknown connection via /v1")
    state = ConnectionState(state_type=ConnectionStateType.LEGACY, connection_id=conn,
                            state={"cursor": "2024-01-01", "n": 5})
    expect_eq(write(api, conn, state).to_dict(), state.to_dict(), "create_or_update via /v1")
    expect_eq(get(api, conn).to_dict(), state.to_dict(), "get via /v1")
    safe = ConnectionState(state_type=ConnectionStateType.LEGACY, connection_id=conn, state={"cursor": "2024-01-02"})
    expect_eq(write(api, conn, safe, safe=True).to_dict(), safe.to_dict(), "create_or_update_safe via /v1")


API_CHECKS = [
    check_get_unknown,
    check_legacy_round_trip,
    check_stream_round_trip,
    check_stream_update_and_delete,
    check_global_round_trip,
    check_safe_round_trip,
    check_type_change_conflict,
    check_not_set_write_rejected,
]
BARE_HOST_CHECKS = [check_bare_host_round_trip]


def main(argv):
    if len(argv) != 2:
        print(f"usage: {argv[0]} BASE_URL", file=sys.stderr)
        return 2
    base = argv[1].rstrip("/")
    print(f"airbyte_state_client {getattr(airbyte_state_client, '__version__', '?')} against {base}")

    passed = failed = 0

    def run(checks, host, label):
        nonlocal passed, failed
        with ApiClient(Configuration(host=host)) as client:
            api = StateApi(client)
            for check in checks:
                name = f"{check.__name__[len('check_'):]} [{label}]"
                try:
                    check(api)
                except CheckFailed as e:
                    failed += 1
                    print(f"FAIL {name}: {e}")
                except ApiException as e:
                    failed += 1
                    print(f"FAIL {name}: unexpected HTTP {e.status}: {e.body!r}")
                except Exception as e:  # noqa: BLE001 - a client-side error is a failed check too
                    failed += 1
                    where = "".join(traceback.format_exception(e, limit=-3, chain=False)).rstrip()
                    print(f"FAIL {name}: unexpected {type(e).__name__}: {e}\n{where}")
                else:
                    passed += 1
                    print(f"ok   {name}")

    run(API_CHECKS, f"{base}/api", "/api")
    run(BARE_HOST_CHECKS, base, "bare host")

    print(f"generated client: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
