"""The Lua side of the policy: runs in its own process, one sender at a time.

Why a separate process: a Lua hook stops a busy loop, but never a single C
function (``string.find`` with a pathological pattern runs for minutes), and
on LuaJIT a memory error can take the whole process down. So the admin's
script runs here, and the parent (:mod:`qrunner.policy`) watches the wall
clock through a small shared memory block: before each ``CheckFile`` call the
worker writes the message's index and the time; if a call overruns, the
parent kills this process, records a policy error for that message and
starts a fresh worker for the rest of the pass. While the script's top level
and ``Start()`` run, the block holds ``LOADING`` and the time, so a load that
overruns is killed too (a load failure).

The protocol over the connection (pickled tuples):
  parent -> ("load", settings)        worker -> ("loaded", uses) | ("load_error", text)
  parent -> ("decide", [message...])  worker -> ("results", [result...])*, ("done",)
  worker -> ("print", text)           at any time, for the parent's log
  worker -> ("abandon", reason)       the state is unusable; the worker exits
Results are sent in small batches (every few milliseconds), not one message
per round trip, so that a 10,000-message queue costs no more than it must.
"""

from __future__ import annotations

import importlib
import struct
import sys
import time
from multiprocessing.connection import Connection
from typing import Any, Dict, List, Optional

PROGRESS = struct.Struct("=qd")  # index of the call under way (-1: none), its monotonic start
LOADING = -2  # the PROGRESS index while the script's top level and Start() run
FLUSH_SECONDS = 0.01
FLUSH_COUNT = 500
PRINT_LIMIT = 200  # lines of print() output logged per call; a loop printing forever cannot flood the log

LUA_MODULES = {
    "5.1": "lupa.lua51",
    "5.2": "lupa.lua52",
    "5.3": "lupa.lua53",
    "5.4": "lupa.lua54",
    "5.5": "lupa.lua55",
    "luajit": "lupa.luajit21",
}

# Versions whose tables honour __len/__pairs and whose table library goes
# through metamethods; older ones get their headers before the call.
LAZY_HEADER_VERSIONS = ("5.3", "5.4", "5.5")

# Globals VPOP3 6.7 added; they exist with VPOP3's defaults so later scripts load.
VPOP3_GLOBALS = {
    "UseBATV": False,
    "MaxMessagesPerConnection": 0,
    "MaxRecipientsPerConnection": 0,
    "MaxRecipientsPerMessage": 0,
    "ConnectedServer": "",
}

PRELUDE = r"""
local emit, fetch_headers, opts = ...
local G = _G
local type, tostring, select, error, pcall, rawget, rawset, rawlen, next, setmetatable =
      type, tostring, select, error, pcall, rawget, rawset, rawlen, next, setmetatable
local string_lower, string_byte, table_concat = string.lower, string.byte, table.concat
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
local deadline = huge
local expired = false
local function hook()
  if clock() > deadline then
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
G.print = function(...)
  printed = printed + 1
  if printed > opts.print_limit then return end
  local parts = {}
  for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
  if printed == opts.print_limit then parts[#parts + 1] = " (further print output of this call suppressed)" end
  emit(table_concat(parts, "\t"))
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

-- Globals of later VPOP3 versions: present, settable, never acted on.
for name, value in pairs(opts.vpop3_globals) do G[name] = value end
G.senderid = opts.senderid
G.sendername = opts.sendername

-- Headers, loaded on first touch. A lazy table fills itself when touched;
-- the sandbox's next/rawget/rawlen see it filled too.
local lazy = setmetatable({}, {__mode = "k"})
local real_next, real_rawget, real_rawlen, real_rawequal = next, rawget, rawlen, rawequal
local function fill(t) local loader = lazy[t] if loader then loader() end end
G.next = function(t, k) fill(t) return real_next(t, k) end
G.rawget = function(t, k) fill(t) return real_rawget(t, k) end
if real_rawlen then G.rawlen = function(t) fill(t) return real_rawlen(t) end end

local function header_tables()
  local data, lines, lower = {}, {}, {}
  local loaded = false
  local function load_headers()
    if loaded then return end
    loaded = true
    lazy[data], lazy[lines] = nil, nil
    local raw, names, values = fetch_headers()
    for i = 1, #raw do rawset(lines, i, raw[i]) end
    for i = 1, #names do
      rawset(data, names[i], values[i])
      lower[string_lower(names[i])] = names[i]
    end
    setmetatable(lines, nil)
  end
  local function lookup(t, k)
    load_headers()
    if type(k) == "string" then
      local name = lower[string_lower(k)]
      if name ~= nil then return rawget(t, name) end
    end
    return nil
  end
  setmetatable(data, {
    __index = lookup,
    __pairs = function(t) load_headers() return real_next, t, nil end,
  })
  if opts.lazy_headers then
    lazy[data], lazy[lines] = load_headers, load_headers
    setmetatable(lines, {
      __index = function(t, k) load_headers() return rawget(t, k) end,
      __len = function(t) load_headers() return rawlen(t) end,
      __pairs = function(t) load_headers() return real_next, t, nil end,
    })
  else
    load_headers()
  end
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
  if type(err) ~= "string" then err = "error object of type " .. type(err) .. ": " .. tostring(err) end
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

local function invoke(filename, size, ctime, returnpath, recipients)
  local actions = {SkipSend = false, Priority = 50, Reason = ""}
  local data, lines = header_tables()
  local checkfile = rawget(G, "CheckFile")
  if type(checkfile) ~= "function" then return "CheckFile is no longer a function" end
  local result = checkfile(filename, actions, size, ctime, returnpath, recipients, data, lines)
  if result == nil then result = actions end
  if type(result) ~= "table" then return "CheckFile returned a " .. type(result) .. " value instead of the Actions table" end
  return nil, result.SkipSend, result.Priority, result.Reason
end

function ctl.call(filename, size, ctime, returnpath, recipients)
  local r = timed(invoke, filename, size, ctime, returnpath, recipients)
  if not r[1] then return failure(r) end
  if r[2] ~= nil then return "error", r[2] end
  local st, sv = simple(r[3])
  local pt, pv = simple(r[4])
  local rt, rv = simple(r[5])
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
"""


class _Writer:
    """Batches results to the parent: a send per few milliseconds, not per message."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.pending: List[tuple] = []
        self.last = time.monotonic()

    def add(self, result: tuple) -> None:
        self.pending.append(result)
        now = time.monotonic()
        if len(self.pending) >= FLUSH_COUNT or now - self.last >= FLUSH_SECONDS:
            self.flush(now)

    def flush(self, now: Optional[float] = None) -> None:
        if self.pending:
            self.conn.send(("results", self.pending))
            self.pending = []
        self.last = now if now is not None else time.monotonic()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class LuaState:
    """One sender's Lua state: the sandbox, the script's globals, its limits."""

    def __init__(self, conn: Connection, settings: Dict[str, Any]):
        lupa = importlib.import_module(LUA_MODULES[settings["lua"]])
        self.conn = conn
        self.settings = settings
        self.current_headers = None
        self.current_index: Optional[int] = None
        kwargs: Dict[str, Any] = {"encoding": None, "unpack_returned_tuples": True, "register_eval": False,
                                  "register_builtins": False}
        kwargs["max_memory"] = settings["memory_mb"] << 20
        self.lua = lupa.LuaRuntime(**kwargs)
        opts = {
            b"timeout": float(settings["timeout"]),
            b"now": settings.get("now"),
            b"senderid": settings["sender_id"],
            b"sendername": settings["sender_name"].encode(),
            b"print_limit": PRINT_LIMIT,
            b"lazy_headers": settings["lua"] in LAZY_HEADER_VERSIONS,
            b"vpop3_globals": self.lua.table_from({k.encode(): (v.encode() if isinstance(v, str) else v)
                                                    for k, v in VPOP3_GLOBALS.items()}),
        }
        prelude = self.lua.execute(PRELUDE.encode(), self._print, self._fetch_headers, self.lua.table_from(opts))
        self.call = prelude[b"call"]
        self.run_top = prelude[b"run_top"]
        self.used_globals = prelude[b"used_globals"]
        self.table_from = self.lua.table_from

    def _print(self, text: bytes) -> None:
        self.conn.send(("print", _text(text), self.current_index))

    def _fetch_headers(self):
        from qrunner.message import header_data

        source = self.current_headers
        lines = source.read() if source is not None else []
        pairs = header_data(lines)
        problem = getattr(source, "problem", None)
        if problem:
            self.conn.send(("print", f"headers not available: {problem}", self.current_index))
        return (self.table_from(lines), self.table_from([n for n, _ in pairs]),
                self.table_from([v for _, v in pairs]))


def _load(conn: Connection, settings: Dict[str, Any], progress) -> Optional[LuaState]:
    try:
        state = LuaState(conn, settings)
    except MemoryError:
        conn.send(("load_error", "memory", f"the Lua state could not be created within {settings['memory_mb']} MB"))
        return None
    except Exception as exc:  # lupa reports a missing Lua build or a broken prelude this way
        conn.send(("load_error", "error", f"cannot start Lua {settings['lua']}: {exc}"))
        return None
    PROGRESS.pack_into(progress, 0, LOADING, time.monotonic())
    try:
        outcome = state.run_top(settings["script_text"], ("@" + settings["script_name"]).encode())
    except MemoryError:
        outcome = (b"memory",)
    finally:
        PROGRESS.pack_into(progress, 0, -1, 0.0)
    if not isinstance(outcome, tuple):
        outcome = (outcome,)
    kind = _text(outcome[0])
    detail = _text(outcome[1]) if len(outcome) > 1 and outcome[1] is not None else ""
    if kind != "ok":
        conn.send(("load_error", kind, detail))
        return None
    conn.send(("loaded", _text(state.used_globals())))
    return state


def _decide(conn: Connection, state: LuaState, messages: List[tuple], progress) -> bool:
    """Run CheckFile over a batch; False when the state had to be abandoned."""
    writer = _Writer(conn)
    call = state.call
    table_from = state.table_from
    for index, (filename, size, ctime, returnpath, recipients, headers) in enumerate(messages):
        state.current_headers = headers
        state.current_index = index
        PROGRESS.pack_into(progress, 0, index, time.monotonic())
        try:
            outcome = call(filename, size, ctime, returnpath, table_from(recipients))
        except MemoryError:
            outcome = (b"memory",)
        PROGRESS.pack_into(progress, 0, -1, 0.0)
        if not isinstance(outcome, tuple):
            outcome = (outcome,)
        kind = _text(outcome[0])
        if kind == "memory":
            writer.add((index, "memory", None))
            writer.flush()
            conn.send(("abandon", "memory"))
            return False
        if kind == "ok":
            skip_kind, skip, prio_kind, prio, reason_kind, reason = outcome[1:]
            writer.add((index, kind, (_text(skip_kind), skip, _text(prio_kind), prio, _text(reason_kind), reason)))
        else:
            writer.add((index, kind, outcome[1:]))
    writer.flush()
    state.current_index = None
    conn.send(("done", _text(state.used_globals())))
    return True


def main(argv: List[str]) -> int:
    """Entry point: ``python -m qrunner.policy_worker CONN_FD PROGRESS_FD``."""
    import mmap

    conn = Connection(int(argv[0]))
    progress = mmap.mmap(int(argv[1]), PROGRESS.size)
    state: Optional[LuaState] = None
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return 0
        if request[0] == "load":
            state = _load(conn, request[1], progress)
        elif request[0] == "decide" and state is not None:
            if not _decide(conn, state, request[1], progress):
                return 0
        elif request[0] == "quit":
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
