-- state/get of one connection (BENCH_CONNECTION), the same request every time.
dofile(os.getenv("BENCH_LUA") .. "/common.lua")

wrk.method = "POST"
wrk.path = "/api/v1/state/get"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"connectionId":"' .. os.getenv("BENCH_CONNECTION") .. '"}'
