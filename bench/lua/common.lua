-- Shared by every bench/lua script: one machine-readable line per wrk run,
-- read by bench/run. Latencies in microseconds.
function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    "RESULT rps=%.2f requests=%d p50_us=%d p99_us=%d max_us=%d non2xx=%d connect=%d read=%d write=%d timeout=%d bytes=%d\n",
    summary.requests / seconds, summary.requests, latency:percentile(50), latency:percentile(99), latency.max,
    e.status, e.connect, e.read, e.write, e.timeout, summary.bytes))
end
