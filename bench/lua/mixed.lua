-- The mixed workload: reads over every project with Zipf-distributed popularity, a share of
-- writes (task status changes and comments) on the same distribution.
-- `wrk ... -s mixed.lua URL -- PLAN_FILE SEED`. The plan (written by bench/workload.py):
--   zipf <s>
--   write <fraction>
--   P <token> <project_id> <task_id>,<task_id>,...      (one line per project, any order)
local report = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "report.lua")

local threads = {}
local names = {"stats", "project", "task", "list", "flags", "patch", "comment", "non2xx", "s5xx"}

function setup(thread)
  thread:set("id", #threads + 1)
  threads[#threads + 1] = thread
end

local projects, cdf = {}, {}
local write_share, s = 0.05, 1.0
local statuses = {"TODO", "IN_PROGRESS", "BLOCKED", "COMPLETED"}
-- Shares of reads: dashboards read stats most, then entities, lists and feature flags.
local reads = {{"stats", 0.45}, {"project", 0.15}, {"task", 0.25}, {"list", 0.10}, {"flags", 0.05}}

local function split(text, sep)
  local out = {}
  for part in string.gmatch(text, "([^" .. sep .. "]+)") do out[#out + 1] = part end
  return out
end

function init(args)
  math.randomseed(tonumber(args[2] or "1") * 7919 + (tonumber(wrk.thread:get("id")) or 1))
  for line in io.lines(args[1]) do
    local f = split(line, " ")
    if f[1] == "zipf" then s = tonumber(f[2])
    elseif f[1] == "write" then write_share = tonumber(f[2])
    elseif f[1] == "P" then
      projects[#projects + 1] = {token = "Bearer " .. f[2], id = f[3], tasks = split(f[4], ",")}
    end
  end
  local total = 0
  for k = 1, #projects do total = total + 1 / (k ^ s) end
  local acc = 0
  for k = 1, #projects do
    acc = acc + 1 / (k ^ s) / total
    cdf[k] = acc
  end
  for _, n in ipairs(names) do _G["c_" .. n] = 0 end
end

local function pick_project()
  local r = math.random()
  local lo, hi = 1, #cdf
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < r then lo = mid + 1 else hi = mid end
  end
  return projects[lo]
end

local function pick_read()
  local r, acc = math.random(), 0
  for _, kv in ipairs(reads) do
    acc = acc + kv[2]
    if r < acc then return kv[1] end
  end
  return "stats"
end

function request()
  local p = pick_project()
  local h = {["Authorization"] = p.token}
  local task = p.tasks[math.random(#p.tasks)]
  local kind
  if math.random() < write_share then
    if math.random() < 0.7 then
      kind = "patch"
      h["Content-Type"] = "application/json"
      _G["c_" .. kind] = _G["c_" .. kind] + 1
      return wrk.format("PATCH", "/api/tasks/" .. task, h,
        '{"status":"' .. statuses[math.random(#statuses)] .. '"}')
    end
    kind = "comment"
    h["Content-Type"] = "application/json"
    _G["c_" .. kind] = _G["c_" .. kind] + 1
    return wrk.format("POST", "/api/tasks/" .. task .. "/comments", h,
      '{"body":"benchmark comment"}')
  end
  kind = pick_read()
  _G["c_" .. kind] = _G["c_" .. kind] + 1
  if kind == "stats" then
    return wrk.format("GET", "/api/projects/" .. p.id .. "/stats", h)
  elseif kind == "project" then
    return wrk.format("GET", "/api/projects/" .. p.id, h)
  elseif kind == "task" then
    return wrk.format("GET", "/api/tasks/" .. task, h)
  elseif kind == "list" then
    return wrk.format("GET", "/api/projects/" .. p.id .. "/tasks", h)
  end
  return wrk.format("GET", "/api/public/feature-flags", {})
end

function response(status, headers, body)
  if status >= 500 then c_s5xx = c_s5xx + 1 end
  if status >= 300 then
    c_non2xx = c_non2xx + 1
    if c_non2xx <= 3 then io.stderr:write("non-2xx " .. status .. ": " .. body .. "\n") end
  end
end

function done(summary, latency, requests)
  report.done(summary, latency, threads, names)
end
