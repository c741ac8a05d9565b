-- wrk script for benches/varied-hit.sh: every request a batch of BATCH tokens drawn at random
-- from IDS (tok-00000000 ...), so no two bodies repeat and the response memo cannot help.
local ids = tonumber(os.getenv("IDS") or "100000")
local batch = tonumber(os.getenv("BATCH") or "20")
local auth = os.getenv("AUTH")
math.randomseed(tonumber(os.getenv("SEED") or "42"))
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = auth
local names = {}
local function body()
  for i = 1, batch do
    names[i] = string.format('"tok-%08d"', math.random(0, ids - 1))
  end
  return '{"operator_type":2,"token_list":[' .. table.concat(names, ",", 1, batch) .. ']}'
end
-- SAME_BODY=1: one random batch sent over and over instead (the proxy's response memo answers
-- it: what a request costs the proxy with the per-identifier work taken away).
local same = os.getenv("SAME_BODY") == "1" and wrk.format(nil, "/v3/device/account/query", nil, body())
request = function()
  return same or wrk.format(nil, "/v3/device/account/query", nil, body())
end
