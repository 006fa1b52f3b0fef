-- wrk script: POST /embed with one sentence of a log-uniform 8-256 words
-- (mean about 71; truncated to the model's limit), or of UNIFORM_WORDS words
-- each when that is set. Prints any non-2xx answers it got.
--
--   wrk -t1 -c32 -d15s -s scripts/mixed.lua http://127.0.0.1:8080/embed
--   UNIFORM_WORDS=72 wrk -t1 -c32 -d15s -s scripts/mixed.lua http://127.0.0.1:8080/embed
local words = {"the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
  "near", "river", "bank", "under", "a", "pale", "sky", "while", "birds", "sing"}
local uniform = tonumber(os.getenv("UNIFORM_WORDS") or "")

local function sentence(n)
  local out = {}
  for i = 1, n do
    out[i] = words[math.random(#words)]
  end
  return table.concat(out, " ")
end

local threads = {}

function setup(thread)
  thread:set("seed", math.random(1, 1000000))
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(seed or os.time())
end

function request()
  local n = uniform
  if n == nil then
    n = math.floor(math.exp(math.log(8) + math.random() * (math.log(256) - math.log(8))))
  end
  local body = '{"inputs": "' .. sentence(n) .. '", "truncate": true}'
  return wrk.format("POST", "/embed", {["Content-Type"] = "application/json"}, body)
end

failed = ""

function response(status, headers, body)
  if status >= 300 then
    failed = failed .. status .. ":" .. body:sub(1, 120) .. "\n"
  end
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format("requests %d, non-2xx %d, p50 %.1f ms, p99 %.1f ms\n",
    summary.requests, errors.status, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
  for _, thread in ipairs(threads) do
    local seen = thread:get("failed")
    if seen ~= "" then io.write("non-2xx:\n" .. seen) end
  end
end
