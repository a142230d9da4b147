-- wrk script for bench/api.py: POST one JSON body (the first argument after "--") on every request,
-- and print the results as one machine-readable line, so bench/api.py does not parse wrk's prose.
--
--   wrk -t1 -c16 -d10s --latency -s bench/post.lua http://127.0.0.1:PORT/settings/listSmtp -- '{"owner_id":...}'

function init(args)
   -- init runs in each wrk thread before its request is built, so setting the body here is enough.
   wrk.method = "POST"
   wrk.body = args[1]
   wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
   -- Times are in microseconds. errors.status counts answers with a status of 400 or more
   -- (wrk's "Non-2xx or 3xx responses").
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
      '"non_2xx_3xx":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
      e.status, e.connect, e.read, e.write, e.timeout))
end
