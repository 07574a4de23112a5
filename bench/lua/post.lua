-- wrk script: POST an OpenAI chat request, the same for direct, nginx and Tokenport.
-- Environment: BENCH_KEY (API key; empty = no Authorization header), BENCH_STREAM=1 for "stream": true,
-- BENCH_MODEL (default smollm2-135m-instruct), BENCH_COUNTRY (X-Client-Country, default KZ).
-- No response() hook on purpose: it would make wrk parse every response in Lua and slow it down;
-- wrk already counts non-2xx/3xx responses in summary.errors.status.
local key = os.getenv("BENCH_KEY") or ""
local stream = os.getenv("BENCH_STREAM") == "1"
local model = os.getenv("BENCH_MODEL") or "smollm2-135m-instruct"
local country = os.getenv("BENCH_COUNTRY") or "KZ"

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
if country ~= "" then wrk.headers["X-Client-Country"] = country end
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"system","content":"You are a helpful assistant."},'
  .. '{"role":"user","content":"Hello! What is the capital of Kazakhstan?"}],"max_tokens":32,"temperature":0.7'
  .. (stream and ',"stream":true' or '') .. '}'

-- One machine-readable line for bench/run.py (latency in microseconds).
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,"err_write":%d,'
    .. '"err_status":%d,"err_timeout":%d,"lat_mean_us":%.1f,"lat_stdev_us":%.1f,"lat_min_us":%d,"lat_max_us":%d,'
    .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
