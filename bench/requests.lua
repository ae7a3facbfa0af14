-- wrk script for the benchmark harness (bench/run.py): replays the lines that
-- examples/bench/tokens.rs wrote (kind, token, ip, user agent) as requests, in
-- turn, each thread from its own offset.
--
--   TW_TOKENS       the file of lines
--   TW_MODE         verify (POST /v1/verify JSON), forward-auth (GET /v1/forward-auth
--                   with the nginx headers), gateway (GET /account through nginx),
--                   healthz (GET /healthz with forward-auth's headers: the same
--                   request but for its path, no decision)
--   TW_APP_KEY      app key for /v1/verify
--   TW_RATE         total requests per second to pace at (0: as fast as possible)
--   TW_CONNECTIONS  the -c given to wrk, to pace each connection

local mode = os.getenv("TW_MODE") or "forward-auth"
local app_key = os.getenv("TW_APP_KEY") or ""
local rate = tonumber(os.getenv("TW_RATE") or "0")
local connections = tonumber(os.getenv("TW_CONNECTIONS") or "1")

local requests = {}
for line in io.lines(os.getenv("TW_TOKENS")) do
  local kind, token, ip, ua = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
  if token then
    if mode == "verify" then
      local body = '{"token":"' .. token .. '","request":{"ip":"' .. ip .. '","user_agent":"' .. ua
        .. '","method":"GET","path":"/account"}}'
      requests[#requests + 1] = wrk.format("POST", "/v1/verify", {
        ["Authorization"] = "Bearer " .. app_key,
        ["Content-Type"] = "application/json",
      }, body)
    elseif mode == "gateway" then
      requests[#requests + 1] = wrk.format("GET", "/account", {
        ["Authorization"] = "Bearer " .. token,
        ["User-Agent"] = ua,
        ["X-Forwarded-For"] = ip,
      })
    else
      local path = mode == "healthz" and "/healthz" or "/v1/forward-auth"
      requests[#requests + 1] = wrk.format("GET", path, {
        ["Authorization"] = "Bearer " .. token,
        ["User-Agent"] = ua,
        ["X-Forwarded-For"] = ip,
        ["X-Original-URI"] = "/account",
        ["X-Original-Method"] = "GET",
      })
    end
  end
end

local counter = 0
local i = 0
function setup(thread)
  thread:set("offset", counter * 7919)
  counter = counter + 1
end

function init(args)
  i = (offset or 0) % #requests
end

function request()
  i = i % #requests + 1
  return requests[i]
end

if rate > 0 then
  function delay()
    return 1000 * connections / rate
  end
end
