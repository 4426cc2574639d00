-- wrk script for the preorder benchmark: POST /api/preorder as many customers.
--
-- Configured by environment variables (wrk passes no structured arguments to every thread):
--   BENCH_TOKENS    file with one customer JWT per line; requests rotate over them
--   BENCH_PRODUCTS  file with one product id per line; one id = a hot product, many = picked at random
--   BENCH_PATH      request path (default /api/preorder)
--
-- Each thread counts answers by status in response(); done() prints one JSON line per run, prefixed
-- with "BENCHJSON ", that the Python driver parses (wrk's human summary is printed too).

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
local next_token = 0
n201, n409, nother, statuses = 0, 0, 0, ""
local other = {}

function init(args)
  local tokens = read_lines(os.getenv("BENCH_TOKENS"))
  products = read_lines(os.getenv("BENCH_PRODUCTS"))
  path = os.getenv("BENCH_PATH") or path
  for i, token in ipairs(tokens) do
    headers_for[i] = {["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}
  end
  -- threads start at different users so they do not walk the same customers in lockstep
  next_token = ((thread_no or 1) - 1) * 997 % #tokens
  math.randomseed(os.time() + (thread_no or 1) * 7919)
end

function request()
  next_token = next_token % #headers_for + 1
  local product = products[1]
  if #products > 1 then product = products[math.random(#products)] end
  local body = '{"product_id":"' .. product .. '","quantity":1}'
  return wrk.format("POST", path, headers_for[next_token], body)
end

function response(status, headers, body)
  if status == 201 then
    n201 = n201 + 1
  elseif status == 409 then
    n409 = n409 + 1
  else
    nother = nother + 1
    other[status] = (other[status] or 0) + 1
    -- a flat "code=count,..." string, because thread:get copies plain values between Lua states
    local parts = {}
    for code, count in pairs(other) do parts[#parts + 1] = code .. "=" .. count end
    statuses = table.concat(parts, ",")
  end
end

function done(summary, latency, requests)
  local c201, c409, cother, codes = 0, 0, 0, {}
  for _, thread in ipairs(threads) do
    c201 = c201 + (thread:get("n201") or 0)
    c409 = c409 + (thread:get("n409") or 0)
    cother = cother + (thread:get("nother") or 0)
    local s = thread:get("statuses") or ""
    if #s > 0 then codes[#codes + 1] = s end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"s201":%d,"s409":%d,"sother":%d,"other_codes":"%s",' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"lat_mean_us":%.1f,"lat_stdev_us":%.1f,"lat_max_us":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    c201, c409, cother, table.concat(codes, ","),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
