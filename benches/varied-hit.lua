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
request = function()
  for i = 1, batch do
    names[i] = string.format('"tok-%08d"', math.random(0, ids - 1))
  end
  return wrk.format(nil, "/v3/device/account/query", nil,
    '{"operator_type":2,"token_list":[' .. table.concat(names, ",", 1, batch) .. ']}')
end
