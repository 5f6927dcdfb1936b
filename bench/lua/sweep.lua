-- Warm-up: GET every line of a file once ("TOKEN PATH" per line), then stop.
-- Run with one thread: `wrk -t1 -c8 ... -s sweep.lua URL -- FILE`.
local report = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "report.lua")
local paths, tokens = {}, {}
local i, answered = 0, 0

function init(args)
  for line in io.lines(args[1]) do
    local token, path = line:match("^(%S+)%s+(%S+)$")
    if token then
      tokens[#tokens + 1] = token
      paths[#paths + 1] = path
    end
  end
end

function request()
  i = i % #paths + 1
  return wrk.format("GET", paths[i], {["Authorization"] = "Bearer " .. tokens[i]})
end

function response(status, headers, body)
  answered = answered + 1
  if answered >= #paths then wrk.thread:stop() end
end

function done(summary, latency, requests)
  report.done(summary, latency, {}, {})
end
