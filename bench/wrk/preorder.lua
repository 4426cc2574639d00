-- wrk script for the preorder benchmark: POST /api/preorder as many customers.
--
-- Configured by environment variables (wrk passes no structured arguments to every thread):
--   BENCH_TOKENS        file with one customer JWT per line; requests rotate over them
--   BENCH_PRODUCTS      file with one product id per line; one id = a hot product, many = picked at random
--   BENCH_PATH          request path (default /api/preorder)
--   BENCH_MAX_REQUESTS  at most this many POSTs over all threads (default: no cap). Counted when request()
--                       builds one, so requests in flight can never take the total past it.
--   BENCH_THREADS       wrk's -t, to split the cap between threads
--   BENCH_STOP_ON_409   "1": a thread finishes at its first 409 (the flash sale's sell-out)
--   BENCH_NOOP_PATH     what a finishing connection asks for instead (GET, default /healthz)
--
-- A thread that reaches its cap, or its first 409 with BENCH_STOP_ON_409, "finishes": it sends no more
-- POSTs, its free connections ask GET BENCH_NOOP_PATH instead (wrk always sends what request() returns),
-- and once every POST it sent is answered (or after BENCH_DRAIN_MS) it stops and prints "BENCHSTOP <n>", so
-- the driver can end wrk's run (SIGINT) without waiting for -d. Answers 200 while finishing are those no-ops.
--
-- Each thread counts answers by status in response(); done() prints one JSON line per run, prefixed
-- with "BENCHJSON ", that the Python driver parses (wrk's human summary is printed too).

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_us()  -- CLOCK_MONOTONIC, the clock the driver reads too
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1e6 + math.floor(tonumber(ts.tv_nsec) / 1000)
end

local function read_lines(path)
  local lines = {}
  local f = assert(io.open(path, "r"), "cannot open " .. tostring(path))
  for line in f:lines() do
    if #line > 0 then lines[#lines + 1] = line end
  end
  f:close()
  assert(#lines > 0, path .. " is empty")
  return lines
end

-- main state: remember the threads so done() can collect their counters
local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_no", thread_count)
  threads[#threads + 1] = thread
end

-- per-thread state (each wrk thread has its own Lua state)
local headers_for = {}  -- token index -> headers table, built once: no string work per request
local products = {}
local path = "/api/preorder"
local noop_request = nil
local next_token = 0
local cap = -1  -- POSTs this thread may still send; -1: no cap
local stop_on_409 = false
local drain_us = 0
local finishing_since = nil
-- wrk calls request() once on thread 1's state before the run, to check that it builds valid HTTP
-- (script_verify_request): that one is never sent, so it must not count against the cap.
local verifying = false
n201, n409, nother, nnoop, sent, statuses = 0, 0, 0, 0, 0, ""
t_first_us, t_409_us, t_last_us = 0, 0, 0
local other = {}

function init(args)
  local tokens = read_lines(os.getenv("BENCH_TOKENS"))
  products = read_lines(os.getenv("BENCH_PRODUCTS"))
  path = os.getenv("BENCH_PATH") or path
  for i, token in ipairs(tokens) do
    headers_for[i] = {["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}
  end
  local me = thread_no or 1
  verifying = me == 1
  local max = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "")
  if max then
    local n = tonumber(os.getenv("BENCH_THREADS") or "1")
    cap = math.floor(max / n) + ((me <= max % n) and 1 or 0)
  end
  stop_on_409 = os.getenv("BENCH_STOP_ON_409") == "1"
  drain_us = (tonumber(os.getenv("BENCH_DRAIN_MS") or "") or 10000) * 1000
  noop_request = wrk.format("GET", os.getenv("BENCH_NOOP_PATH") or "/healthz")
  -- threads start at different users so they do not walk the same customers in lockstep
  next_token = (me - 1) * 997 % #tokens
  math.randomseed(os.time() + me * 7919)
end

local function answered()
  return n201 + n409 + nother
end

local stopped = false
local function stop()
  if stopped then return end
  stopped = true
  io.write(string.format("BENCHSTOP %d\n", thread_no or 1))
  io.flush()
  wrk.thread:stop()
end

local function post()
  next_token = next_token % #headers_for + 1
  local product = products[1]
  if #products > 1 then product = products[math.random(#products)] end
  local body = '{"product_id":"' .. product .. '","quantity":1}'
  return wrk.format("POST", path, headers_for[next_token], body)
end

function request()
  if verifying then
    verifying = false
    return post()
  end
  if finishing_since == nil and cap == 0 then
    finishing_since = now_us()
  end
  if finishing_since ~= nil then
    if answered() >= sent or now_us() - finishing_since > drain_us then
      stop()
    end
    return noop_request
  end
  if sent == 0 then t_first_us = now_us() end
  sent = sent + 1
  if cap > 0 then cap = cap - 1 end
  return post()
end

function response(status, headers, body)
  if finishing_since ~= nil and status == 200 then
    nnoop = nnoop + 1
    return
  end
  t_last_us = now_us()
  if status == 201 then
    n201 = n201 + 1
  elseif status == 409 then
    n409 = n409 + 1
    if stop_on_409 and finishing_since == nil then
      t_409_us = t_last_us
      finishing_since = t_last_us
    end
  else
    nother = nother + 1
    other[status] = (other[status] or 0) + 1
    -- a flat "code=count,..." string, because thread:get copies plain values between Lua states
    local parts = {}
    for code, count in pairs(other) do parts[#parts + 1] = code .. "=" .. count end
    statuses = table.concat(parts, ",")
  end
  if finishing_since ~= nil and answered() >= sent then
    stop()  -- the last POST in flight is answered: nothing left to wait for
  end
end

function done(summary, latency, requests)
  local c201, c409, cother, cnoop, csent, codes = 0, 0, 0, 0, 0, {}
  local first, soldout, last = 0, 0, 0
  for _, thread in ipairs(threads) do
    c201 = c201 + (thread:get("n201") or 0)
    c409 = c409 + (thread:get("n409") or 0)
    cother = cother + (thread:get("nother") or 0)
    cnoop = cnoop + (thread:get("nnoop") or 0)
    csent = csent + (thread:get("sent") or 0)
    local s = thread:get("statuses") or ""
    if #s > 0 then codes[#codes + 1] = s end
    local f, x, l = thread:get("t_first_us") or 0, thread:get("t_409_us") or 0, thread:get("t_last_us") or 0
    if f > 0 and (first == 0 or f < first) then first = f end
    if x > 0 and (soldout == 0 or x < soldout) then soldout = x end
    if l > last then last = l end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"s201":%d,"s409":%d,"sother":%d,"other_codes":"%s","noops":%d,"sent":%d,' ..
    '"t_first_us":%.0f,"t_409_us":%.0f,"t_last_us":%.0f,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"lat_mean_us":%.1f,"lat_stdev_us":%.1f,"lat_max_us":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    c201, c409, cother, table.concat(codes, ","), cnoop, csent,
    first, soldout, last,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
