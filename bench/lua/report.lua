-- Shared by the benchmark's wrk scripts: one machine-readable line at the end of a run.
-- Latencies are in microseconds; per-thread counters (globals named c_<name>) are summed.

local M = {}

function M.here()
  local source = debug.getinfo(2, "S").source
  return source:match("^@(.*/)") or "./"
end

function M.done(summary, latency, threads, counter_names)
  local e = summary.errors
  local counters = {}
  for _, name in ipairs(counter_names or {}) do
    local total = 0
    for _, t in ipairs(threads or {}) do total = total + (tonumber(t:get("c_" .. name)) or 0) end
    counters[#counters + 1] = string.format('"%s":%d', name, total)
  end
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"max":%d},"counters":{%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, table.concat(counters, ",")))
end

return M
