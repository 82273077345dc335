-- wrk script of `make bench` (bench/run.py): POST one JSON body on every request and
-- print one machine-readable summary line at the end.
--
--   BENCH_BODY='{"model":"m","messages":[...]}' wrk -t1 -c32 -d5s -s bench/post.lua URL
--
-- Environment:
--   BENCH_BODY   the request body (required)
--   BENCH_AUTH   optional bearer token, sent as "Authorization: Bearer <token>"
--
-- The summary line starts with "BENCH_RESULT " followed by a JSON object. Latencies are
-- microseconds from wrk's own histogram (request sent to the last byte of the reply, so
-- for a streamed reply the whole stream). Every reply that is not 2xx/3xx counts in
-- "status"; socket errors and wrk's timeouts in the other error fields.

local body = os.getenv("BENCH_BODY")
if body == nil or body == "" then
  error("BENCH_BODY is not set")
end

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "*/*"

local auth = os.getenv("BENCH_AUTH")
if auth ~= nil and auth ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. auth
end

function done(summary, latency, requests)
  local e = summary.errors
  local fields = {
    string.format('"requests":%d', summary.requests),
    string.format('"duration_us":%d', summary.duration),
    string.format('"bytes":%d', summary.bytes),
    string.format('"err_connect":%d', e.connect),
    string.format('"err_read":%d', e.read),
    string.format('"err_write":%d', e.write),
    string.format('"err_status":%d', e.status),
    string.format('"err_timeout":%d', e.timeout),
    string.format('"lat_min":%d', latency.min),
    string.format('"lat_mean":%.1f', latency.mean),
    string.format('"lat_max":%d', latency.max),
    string.format('"p50":%d', latency:percentile(50)),
    string.format('"p90":%d', latency:percentile(90)),
    string.format('"p99":%d', latency:percentile(99)),
    string.format('"p999":%d', latency:percentile(99.9)),
  }
  io.write("BENCH_RESULT {" .. table.concat(fields, ",") .. "}\n")
end
