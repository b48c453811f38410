-- qrunner's Lua prelude (run by qrunner/policy_worker.py before the admin's script): sandbox, limits, lazy headers.
local emit, fetch_headers, opts = ...
local G = _G
local type, tostring, select, error, pcall, rawget, rawset, rawlen, next, setmetatable =
      type, tostring, select, error, pcall, rawget, rawset, rawlen, next, setmetatable
local string_lower, string_byte, string_gmatch, table_concat = string.lower, string.byte, string.gmatch, table.concat
local huge = math.huge
local clock = os.clock           -- our own reference: a script may replace os.clock
local sethook = debug.sethook
local real_load, real_loadstring, real_setfenv = load, loadstring, setfenv
local unpack = table.unpack or unpack
local co_create, co_resume, co_status = coroutine.create, coroutine.resume, coroutine.status
local timeout = opts.timeout
local TIMEOUT = "__qrunner_timeout__"
local function pack(...) return {n = select("#", ...), ...} end

-- The time limit. os.clock() is the process's CPU time, which for a busy
-- script is close to the wall clock; the parent's wall-clock watchdog covers
-- the rest (a C function no hook can interrupt, a starved process).
-- A CheckFile call does not read the clock as it starts (os.clock() is a
-- system call, the dearest part of a small call): it disarms the deadline,
-- and the hook's first run in the call (within HOOK_COUNT instructions) sets
-- it from there. Time spent before that in one C function is the watchdog's,
-- as any time inside one C function is.
local deadline = huge
local armed = true
local expired = false
local function hook()
  if not armed then
    armed = true
    deadline = clock() + timeout
  elseif clock() > deadline then
    expired = true
    error(TIMEOUT, 0)
  end
end
local HOOK_COUNT = 1000
if G.jit then G.jit.off() end    -- LuaJIT runs hooks only in the interpreter
sethook(hook, "", HOOK_COUNT)

local function with_hook(co)
  sethook(co, hook, "", HOOK_COUNT)
  return co
end
coroutine.create = function(f) return with_hook(co_create(f)) end
coroutine.wrap = function(f)
  local co = coroutine.create(f)
  return function(...)
    local results = pack(co_resume(co, ...))
    if results[1] then return unpack(results, 2, results.n) end
    error(results[2], 0)
  end
end

-- Loading: text only (a binary chunk can break out of any sandbox).
local function collect(reader)
  local parts = {}
  while true do
    local piece = reader()
    if piece == nil or piece == "" then break end
    if type(piece) ~= "string" then return nil end
    parts[#parts + 1] = piece
  end
  return table_concat(parts)
end
local function load_text(chunk, name, mode, env)
  if type(chunk) == "function" then chunk = collect(chunk) end
  if type(chunk) ~= "string" then return nil, "load: only text chunks can be loaded" end
  if string_byte(chunk, 1) == 27 then return nil, "load: binary chunks are not allowed" end
  if real_setfenv then
    local fn, err = real_loadstring(chunk, name)
    if fn and env ~= nil then real_setfenv(fn, env) end
    return fn, err
  end
  if env ~= nil then return real_load(chunk, name, "t", env) end
  return real_load(chunk, name, "t")
end
G.load = load_text
if real_loadstring then G.loadstring = function(s, name) return load_text(s, name) end end

local real_collectgarbage = collectgarbage
G.collectgarbage = function(what, ...)
  if what == nil or what == "collect" or what == "count" or what == "step" then
    return real_collectgarbage(what, ...)
  end
  error("collectgarbage('" .. tostring(what) .. "') is not available to policy scripts", 2)
end

-- print goes to qrunner's log, never to stdout.
local printed = 0
-- Each line counts towards the cap and is logged on its own, so printed text can never pass for a line of
-- qrunner's own.
G.print = function(...)
  if printed >= opts.print_limit then return end
  local parts = {}
  for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
  for line in string_gmatch(table_concat(parts, "\t") .. "\n", "([^\n]*)\n") do
    printed = printed + 1
    if printed > opts.print_limit then return end
    -- (Lua 5.5's loop variables are constants: the marked line is a new local)
    local shown = line
    if printed == opts.print_limit then shown = line .. " (further print output of this call suppressed)" end
    emit(shown)
  end
end

-- The fixed clock of --now: only calls without a time argument see it.
if opts.now then
  local real_time, real_date, now = os.time, os.date, opts.now
  os.time = function(t) if t == nil then return now end return real_time(t) end
  os.date = function(fmt, t) if t == nil then t = now end return real_date(fmt, t) end
end

-- Ways to end, hang or escape the process, or to read the host: gone.
for _, name in ipairs({"exit", "execute", "remove", "rename", "tmpname", "getenv", "setlocale"}) do os[name] = nil end
for _, name in ipairs({"io", "require", "package", "dofile", "loadfile", "debug", "python", "jit", "module", "newproxy"}) do G[name] = nil end
string.dump = nil

-- A metatable on _G (a strict-globals module errors for every undeclared name) must not reach lupa's own
-- lookup of the global "debug", which it makes outside any protected call around each call into Lua: an error
-- there is a PANIC that ends the worker. So the metatable installed on _G asks the script's own one at each
-- access (strict.lua sets its __index and __newindex after the setmetatable call), except for the host's names;
-- getmetatable(_G) returns the script's own.
local HOST_NAMES = {debug = true}
local real_setmetatable, real_getmetatable = setmetatable, getmetatable
local script_G_metatable = nil
local function delegated(mt)
  local installed = {}
  for k, v in next, mt do installed[k] = v end
  installed.__index = function(t, k)
    if HOST_NAMES[k] then return nil end
    local index = rawget(mt, "__index")
    if index == nil then return nil end
    if type(index) == "function" then return index(t, k) end
    return index[k]
  end
  installed.__newindex = function(t, k, v)
    local newindex = rawget(mt, "__newindex")
    if newindex == nil then rawset(t, k, v)
    elseif type(newindex) == "function" then newindex(t, k, v)
    else newindex[k] = v end
  end
  return installed
end
G.setmetatable = function(t, mt)
  if t ~= G or type(mt) ~= "table" then
    if t == G then script_G_metatable = nil end
    return real_setmetatable(t, mt)
  end
  real_setmetatable(G, delegated(mt))
  script_G_metatable = mt
  return t
end
G.getmetatable = function(t)
  if t == G and script_G_metatable ~= nil then
    local protected = rawget(script_G_metatable, "__metatable")
    if protected ~= nil then return protected end
    return script_G_metatable
  end
  return real_getmetatable(t)
end

-- Globals of later VPOP3 versions: present, settable, never acted on.
for name, value in pairs(opts.vpop3_globals) do G[name] = value end
G.senderid = opts.senderid
G.sendername = opts.sendername

-- Headers, loaded on first touch. A lazy table fills itself when touched;
-- the sandbox's next/rawget/rawlen see it filled too. The metatables are
-- shared by every call, so a call makes three small tables and no closure:
-- each table's call state (`st`) is found in the weak-keyed tables `owner`
-- (HeaderData) and `lazy` (both, until loaded). Only the lazy versions (5.3+,
-- whose weak tables are ephemerons) keep the tables in their state; on the
-- others a weak-keyed entry whose value held its key would never be collected.
local lazy = setmetatable({}, {__mode = "k"})
local owner = setmetatable({}, {__mode = "k"})
local real_next, real_rawget, real_rawlen, real_rawequal = next, rawget, rawlen, rawequal

-- HeaderData is read from the lines here, in Lua, not in Python: the worker hands over one table of lines per
-- message instead of three, and Lua's string functions do per field what a Python loop did at several times the
-- cost. The rules (these lines are their one statement): a field's name runs up to its first colon
-- (blanks before the colon allowed; no blank, line break or colon in it, not empty); the first occurrence of a
-- name wins, names compared in ASCII without case; the value is unfolded (each line break, and a CR just before
-- it, removed), then the blanks, tabs and CRs at either end stripped. A line that is no field stays in
-- HeaderLines only.
local string_find, string_sub, string_gsub = string.find, string.sub, string.gsub
local ASCII_LOWER = {}
for b = 65, 90 do ASCII_LOWER[string.char(b)] = string.char(b + 32) end
-- Names are compared in ASCII, whatever the process's locale; where string.lower is ASCII's (the C and UTF-8
-- locales), the one lower-cased name serves both as the key of the comparison and of the lookup.
local lower_is_ascii = true
for b = 0, 255 do
  local c = string.char(b)
  if string_lower(c) ~= (ASCII_LOWER[c] or c) then lower_is_ascii = false end
end

-- The value of the field whose colon is at ``colon``, its blanks at ``start`` (the first byte after them).
local function field_value(line, colon, start)
  local last = #line
  if string_find(line, "\n", start, true) then  -- folded: unfold first, then strip
    local value = string_gsub(string_sub(line, colon + 1), "\r?\n", "")
    start, last = string_find(value, "[^ \t\r]"), #value
    if start == nil then return "" end
    line = value
  end
  local b = string_byte(line, last)
  while b == 32 or b == 9 or b == 13 do
    last = last - 1
    b = string_byte(line, last)
  end
  return string_sub(line, start, last)
end

local FIELD = "^([^:\n \t]+)[ \t]*:()[ \t\r]*()"

-- Every field into data, in line order, and the names into st.lower: the whole table at once (what the eager
-- versions do at each call, and what the lazy ones do when a script looks at the whole table). A field a read by
-- name has already set (st.lower[key] is its name) is left as the script may since have changed it.
local function fill_tables(st, data, raw)
  local valued = st.lower or {}
  local lower = {}
  local seen = lower_is_ascii and lower or {}
  for i = 1, #raw do
    local line = raw[i]
    local _, _, name, colon, start = string_find(line, FIELD)
    if name ~= nil then
      local key = string_lower(name)
      local first = lower_is_ascii and key or string_gsub(name, "[A-Z]", ASCII_LOWER)
      if seen[first] == nil then
        seen[first] = name
        lower[key] = name
        if type(valued[key]) ~= "string" then rawset(data, name, field_value(line, colon - 1, start)) end
      end
    end
  end
  st.lower = lower
end

-- The lines of the tables' own message (st.index: its place in the pass), fetched from qrunner on the first
-- touch of either table: in its own call, or in a later one when the script kept the tables.
local function raw_lines(st)
  local raw = st.raw
  if raw == nil then
    raw = fetch_headers(st.index)
    st.raw = raw
  end
  return raw
end

-- The lazy tables are filled in steps. A read of one field by name (h.subject) indexes the lines only up to
-- that field (st.lower[key] = its line, st.scanned = the lines indexed) and sets only its value (st.lower[key]
-- = its name from then on); anything that sees the whole table (pairs, next, rawget, rawlen) fills it whole
-- first (st.full). The lines table fills on its own first touch. Field by field needs string.lower to be
-- ASCII's (one first occurrence per lower-cased name); where it is not, a read fills the whole table.
local function fill_data(st)
  if st.full then return end
  st.full = true
  local data = st.data
  st.data = nil
  lazy[data] = nil
  fill_tables(st, data, raw_lines(st))
  if st.lines == nil then st.raw = nil end  -- both tables full: the lines are theirs now
end

local function fill_lines(st)
  local lines = st.lines
  if lines == nil then return end
  st.lines = nil
  lazy[lines] = nil
  local raw = raw_lines(st)
  for i = 1, #raw do rawset(lines, i, raw[i]) end
  setmetatable(lines, nil)
  if st.full then st.raw = nil end
end

-- The line of the first field named `key` (lower-cased), indexing the lines not yet indexed up to it; nil if none.
local function index_to(st, key)
  local raw, lower = raw_lines(st), st.lower
  if lower == nil then
    lower = {}
    st.lower = lower
  end
  for i = st.scanned + 1, #raw do
    local _, _, name = string_find(raw[i], FIELD)
    local found = name and string_lower(name)
    if found ~= nil and lower[found] == nil then lower[found] = i end
    st.scanned = i  -- only once the line is indexed: a call stopped half-way leaves it for the next look
    if found == key then return i end
  end
  return nil
end

local function field(st, data, key)
  local lower = st.lower
  local at = lower and lower[key]
  if at == nil and not st.full then at = index_to(st, key) end
  if type(at) == "number" then  -- indexed, not valued yet
    local line = st.raw[at]
    local _, _, name, colon, start = string_find(line, FIELD)
    rawset(data, name, field_value(line, colon - 1, start))
    st.lower[key] = name
    at = name
  end
  if at ~= nil then return rawget(data, at) end
  return nil
end

local function fill(t)
  local st = lazy[t]
  if st then
    if t == st.lines then fill_lines(st) else fill_data(st) end
  end
end
G.next = function(t, k) fill(t) return real_next(t, k) end
G.rawget = function(t, k) fill(t) return real_rawget(t, k) end
if real_rawlen then G.rawlen = function(t) fill(t) return real_rawlen(t) end end

local DATA_MT = {
  __index = function(t, k)
    local st = owner[t]
    if type(k) ~= "string" then
      fill_data(st)
      return nil
    end
    if not lower_is_ascii then fill_data(st) end
    return field(st, t, string_lower(k))
  end,
  __pairs = function(t) fill_data(owner[t]) return real_next, t, nil end,
  -- A name not in the table yet: the whole table first, so that no later fill undoes what the script wrote.
  __newindex = function(t, k, v) fill_data(owner[t]) rawset(t, k, v) end,
}
local LINES_MT = {
  __index = function(t, k) fill(t) return rawget(t, k) end,
  __len = function(t) fill(t) return rawlen(t) end,
  __pairs = function(t) fill(t) return real_next, t, nil end,
}

local function header_tables(index)
  local data, lines = {}, {}
  local st
  if opts.lazy_headers then
    st = {full = false, data = data, lines = lines, scanned = 0, index = index}  -- st.lower: by the first read by name
    lazy[data], lazy[lines] = st, st
    setmetatable(lines, LINES_MT)
  else
    st = {full = true}
    local raw = fetch_headers()
    fill_tables(st, data, raw)
    for i = 1, #raw do rawset(lines, i, raw[i]) end
  end
  owner[data] = st
  setmetatable(data, DATA_MT)
  return data, lines
end

local function simple(v)
  local t = type(v)
  if t == "number" or t == "string" or t == "boolean" or t == "nil" then return t, v end
  return t, nil
end

local function timed(fn, ...)
  printed = 0
  expired = false
  deadline = clock() + timeout
  local results = {pcall(fn, ...)}
  deadline = huge
  -- A script's own pcall or coroutine.resume may have caught the timeout
  -- error: the call still overran, so it still counts as a timeout.
  if expired then results = {false, TIMEOUT} end
  return results
end

local function failure(results)
  if expired then return "timeout" end
  local err = results[2]
  if err == "not enough memory" then return "memory" end
  if type(err) ~= "string" then
    -- an error object's own __tostring may fail, or return no string: that must not take the worker down
    local ok, text = pcall(tostring, err)
    if not ok or type(text) ~= "string" then text = "(its __tostring failed)" end
    err = "error object of type " .. type(err) .. ": " .. text
  end
  return "error", err
end

local ctl = {}

function ctl.run_top(chunk, name)
  local fn, err = load_text(chunk, name)
  if not fn then return "syntax", err end
  local results = timed(fn)
  if not results[1] then return failure(results) end
  if type(rawget(G, "CheckFile")) ~= "function" then return "nocheckfile" end
  local start = rawget(G, "Start")
  if type(start) == "function" then
    results = timed(start)
    if not results[1] then
      local kind, text = failure(results)
      return "start_" .. kind, text
    end
  end
  return "ok"
end

local function invoke(filename, size, ctime, returnpath, recipients, index)
  local actions = {SkipSend = false, Priority = 50, Reason = ""}
  local data, lines = header_tables(index)
  local checkfile = rawget(G, "CheckFile")
  if type(checkfile) ~= "function" then return "CheckFile is no longer a function" end
  local result = checkfile(filename, actions, size, ctime, returnpath, recipients, data, lines)
  if result == nil then result = actions end
  if type(result) ~= "table" then return "CheckFile returned a " .. type(result) .. " value instead of the Actions table" end
  return nil, result.SkipSend, result.Priority, result.Reason
end

-- One CheckFile call, timed as timed() times a call but with the deadline armed by the hook (above), and
-- without packing its results into a table: the hot path, once per message.
function ctl.call(filename, size, ctime, returnpath, recipients, index)
  printed = 0
  expired = false
  deadline = huge
  armed = false
  local ok, err, skip, priority, reason = pcall(invoke, filename, size, ctime, returnpath, recipients, index)
  armed = true
  deadline = huge
  if expired then return failure({false, TIMEOUT}) end
  if not ok then return failure({false, err}) end
  if err ~= nil then return "error", err end
  local st, sv = simple(skip)
  local pt, pv = simple(priority)
  local rt, rv = simple(reason)
  if rt == "number" then rv = tostring(rv) rt = "string" end
  return "ok", st, sv, pt, pv, rt, rv
end

function ctl.used_globals()
  local used = {}
  for name, default in pairs(opts.vpop3_globals) do
    if rawget(G, name) ~= default then used[#used + 1] = name end
  end
  for _, name in ipairs({"ServerConnected", "ReturnCodeHandler"}) do
    if type(rawget(G, name)) == "function" then used[#used + 1] = name end
  end
  return table_concat(used, ",")
end

return ctl
