-- GET one path with a bearer token: `wrk ... -s auth.lua URL -- TOKEN`.
-- Without a token (the /health baseline) it sends no Authorization header.
local report = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "report.lua")

function init(args)
  if args[1] and args[1] ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. args[1]
  end
end

function done(summary, latency, requests)
  report.done(summary, latency, {}, {})
end
