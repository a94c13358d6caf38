-- state/create_or_update of one stream per request; every request changes
-- the stream's blob (a per-thread counter), so every write is a revision.
--
--   BENCH_CONNECTION  the connection to write; when empty, a random one of
--                     1000 (00000000-0000-4000-9000-000000000000 … 999)
--   BENCH_STREAMS     the stream written is a random one of table_00000 …
--                     table_<BENCH_STREAMS-1>, namespace "public" (default 1)
--   BENCH_OPERATION   create_or_update (default: Airbyte's write, answered
--                     with the whole state) or stream_set (state/stream/set,
--                     answered with the one stream)
dofile(os.getenv("BENCH_LUA") .. "/common.lua")

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local fixed = os.getenv("BENCH_CONNECTION") or ""
local streams = tonumber(os.getenv("BENCH_STREAMS") or "1")
local counter = 0

function init(args)
  math.randomseed((tid or 0) * 7919 + os.time())
end

local stream_set = (os.getenv("BENCH_OPERATION") or "") == "stream_set"

wrk.method = "POST"
wrk.path = stream_set and "/api/v1/state/stream/set" or "/api/v1/state/create_or_update"
wrk.headers["Content-Type"] = "application/json"

function request()
  counter = counter + 1
  local connection = fixed
  if connection == "" then
    connection = string.format("00000000-0000-4000-9000-%012d", math.random(0, 999))
  end
  local stream = math.random(0, streams - 1)
  if stream_set then
    return wrk.format(nil, nil, nil, string.format(
      '{"connectionId":"%s","streamDescriptor":{"name":"table_%05d","namespace":"public"},' ..
      '"streamState":{"cursor":"2024-06-01T00:00:00Z","offset":%d}}',
      connection, stream, (tid or 0) * 1000000000 + counter))
  end
  local body = string.format(
    '{"connectionId":"%s","connectionState":{"stateType":"stream","streamState":[' ..
    '{"streamDescriptor":{"name":"table_%05d","namespace":"public"},' ..
    '"streamState":{"cursor":"2024-06-01T00:00:00Z","offset":%d}}]}}',
    connection, stream, (tid or 0) * 1000000000 + counter)
  return wrk.format(nil, nil, nil, body)
end
