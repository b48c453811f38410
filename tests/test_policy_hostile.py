"""Hostile policy scripts on every Lua qrunner supports (issue 14, point 2; the contract is DESIGN.md section 2).

One engine pass per Lua offers one message per hostile act, so each act runs in the state the acts before it left:
errors raised with a value of every type, recursion that overflows the Lua stack and the C stack, return values of
every wrong type, metatables put on the argument tables and on the returned table (whose metamethods fail or never
end), the removed ways out of the sandbox (``os.exit``, ``io.popen``, ``os.execute``, ``require``,
``collectgarbage('stop')``), a finalizer that never ends and a print of ten megabytes. Each message's outcome is the
contract's: a policy error for that message (held under the default ``on_script_error = skip``), the others decided
as the script says, the worker alive. Scripts that put a strict-globals metatable on ``_G`` must load and run as they
do in the standard ``lua``; a syntax error is a load failure naming the file and the line. A hang-guard (SIGALRM,
far above any limit) turns a stuck engine into a failure instead of a stuck suite; nothing asserts a duration.
"""

from __future__ import annotations

import signal

import pytest

from policy_helpers import (DEFAULT, LUA_VERSIONS, by_id, decide, message, policy_log,  # noqa: F401
                            settings, write_script)
from qrunner.exceptions import ScriptLoadError
from qrunner.policy import PolicyEngine

# message id -> the body that runs when CheckFile gets that message (its Filename)
ACTS = {
    "ERR_STRING": 'error("boom")',
    "ERR_NIL": "error(nil)",
    "ERR_TABLE": "error({code = 7})",
    "ERR_FUNCTION": "error(print)",
    "ERR_COROUTINE": "error(coroutine.create(function() end))",
    "ERR_TRUE": "error(true)",
    "ERR_FALSE": "error(false)",
    "ERR_NUMBER": "error(42)",
    "ERR_NAN": "error(0/0)",
    "ERR_LEVEL": 'error("with a level", 2)',
    "LUA_STACK": "local function r(n) return 1 + r(n + 1) end r(1)",
    "C_STACK": 'local function r() return ("x"):gsub("x", r) end r()',
    "RET_NUMBER": "return 5",
    "RET_STRING": 'return "send"',
    "RET_TRUE": "return true",
    "RET_FUNCTION": "return print",
    "RET_COROUTINE": "return coroutine.create(print)",
    "META_FAILING_INDEX": 'return setmetatable({}, {__index = function() error("no field for you") end})',
    "META_ENDLESS_INDEX": "return setmetatable({}, {__index = function() while true do end end})",
    "META_ON_ACTIONS": ('setmetatable(a, {__index = function() error("no") end, '
                        '__newindex = function() error("no") end}) return a'),
    "META_ON_ARGUMENTS": ('setmetatable(rcpts, {__index = function() error("x") end}) '
                          'setmetatable(hd, {__index = function() error("x") end}) '
                          'setmetatable(hl, {__len = function() error("x") end}) return a'),
    "OS_EXIT": "os.exit(3)",
    "IO_POPEN": 'io.popen("id")',
    "OS_EXECUTE": 'os.execute("touch escaped")',
    "REQUIRE": 'require("os")',
    "GC_STOP": 'collectgarbage("stop")',
    "ENDLESS_FINALIZER": "setmetatable({}, {__gc = function() while true do end end}) collectgarbage()",
    "PRINT_10MB": 'print(string.rep("x", 10 * 1024 * 1024))',
}

SCRIPT = """
function CheckFile(f, a, size, created, from, rcpts, hd, hl)
  %s
  a.SkipSend = true
  a.Reason = "decided " .. f
  return a
end
"""

# Acts the contract does not make an error. Returning the Actions table before the skip is set sends it with the
# defaults (the metatables on it and on the other arguments change nothing qrunner reads); a 10 MB print is a
# line in the log, cut short there.
SENT = {"META_ON_ACTIONS", "META_ON_ARGUMENTS"}
DECIDED = {"PRINT_10MB"}
# A __gc metamethod on a table is Lua 5.2+ (5.1 and LuaJIT never call it): there the message is decided as scripted.
MAY_DECIDE = {"ENDLESS_FINALIZER"}


def _script() -> str:
    branches = "\n  ".join(f'if f == "{name}" then {code} end' for name, code in ACTS.items())
    return SCRIPT % branches


class Hung(Exception):
    pass


@pytest.fixture
def hang_guard():
    """Fails a test whose engine never comes back (far beyond any limit the scripts run into)."""
    def alarm(signum, frame):
        raise Hung("the policy engine did not come back within 300 s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(300)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.reliability
@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_every_hostile_act_is_a_policy_error_for_its_message_only(tmp_path, policy_log, hang_guard, figures, lua):
    names = list(ACTS)
    ms = [message("FIRST", arrival=1, filename="FIRST")]
    ms += [message(name, arrival=10 + i, filename=name) for i, name in enumerate(names)]
    ms += [message("LAST", arrival=1000, filename="LAST")]

    decisions = by_id(decide(tmp_path, _script(), ms, lua=lua, timeout=1))

    assert decisions["FIRST"].reason == "decided FIRST" and decisions["FIRST"].errors == ()
    assert decisions["LAST"].reason == "decided LAST" and decisions["LAST"].errors == ()
    for name in names:
        d = decisions[name]
        if name in SENT:
            assert d.send is True and d.priority == 50 and d.errors == (), (name, d.errors)
        elif name in DECIDED or (name in MAY_DECIDE and not d.errors):
            assert d.send is False and d.errors == () and d.reason == f"decided {name}", (name, d.errors)
        else:  # a policy error, held under the default on_script_error = skip
            assert d.send is False and len(d.errors) == 1 and d.reason.startswith("policy error: "), \
                (name, d.errors, d.reason)
    died = [line for line in policy_log.lines if "worker died" in line]
    # LuaJIT's own crash on a C stack overflow (string.gsub calling back into itself) kills the worker: the
    # contract's "abandoned state": that message is a policy error and the rest of the pass runs in a fresh state
    assert died == (["C_STACK: sender default: the Lua worker died during CheckFile; the Lua state was abandoned and "
                     "the rest of this pass runs in a fresh state (top level and Start() run again)"]
                    if lua == "luajit" else []), died
    assert not (tmp_path / "escaped").exists()
    [printed] = [line for line in policy_log.lines if line.startswith("PRINT_10MB: script")]
    assert printed.endswith(f"xxx... ({10 * 1024 * 1024 - 4096} more characters not logged)")
    figures.record("inputs", f"hostile policy acts on Lua {lua}", tried=len(names), survived=len(names))


STRICT = """
-- a strict-globals module, as scripts load them: reading or creating an undeclared global is an error
local declared = {CheckFile = true, Start = true, counted = true}
setmetatable(_G, {
  __index = function(_, name) error("undeclared global '" .. tostring(name) .. "'", 2) end,
  __newindex = function(t, name, value)
    if not declared[name] then error("assignment to undeclared global '" .. tostring(name) .. "'", 2) end
    rawset(t, name, value)
  end,
})
counted = 0
function Start() counted = 0 end
function CheckFile(f, a, size, created, from, rcpts, hd, hl)
  counted = counted + 1
  a.SkipSend = true
  a.Reason = "strict " .. counted .. " " .. tostring(hd.subject)
  return a
end
"""


@pytest.mark.reliability
@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_a_strict_globals_metatable_on_G_loads_and_runs(tmp_path, policy_log, hang_guard, figures, lua):
    ms = [message("A", arrival=1, headers=["Subject: one"]), message("B", arrival=2, headers=["Subject: two"])]

    a, b = decide(tmp_path, STRICT, ms, lua=lua)

    assert (a.reason, b.reason) == ("strict 1 one", "strict 2 two")
    assert a.errors == b.errors == ()
    assert "worker died" not in policy_log.text
    figures.record("inputs", f"strict-globals metatable on _G, Lua {lua}", tried=1, survived=1)


# The shape of Lua's own etc/strict.lua: the metatable is set first, its metamethods assigned after; a function
# that reads an undeclared global is an error, as in the standard lua (strict.lua's own check uses debug.getinfo,
# which the sandbox removes, so this one declares by assignment at the top level).
STRICT_LATE = """
local mt = getmetatable(_G)
if mt == nil then mt = {} setmetatable(_G, mt) end
mt.__declared = {}
mt.__newindex = function(t, n, v) mt.__declared[n] = true rawset(t, n, v) end
mt.__index = function(t, n)
  if not mt.__declared[n] then error("variable '" .. n .. "' is not declared", 2) end
  return rawget(t, n)
end
function CheckFile(f, a)
  if f == "UNDECLARED" then return undeclared_name end
  a.SkipSend = true
  a.Reason = "strict, metatable the script's own: " .. tostring(getmetatable(_G) == mt)
  return a
end
"""


@pytest.mark.reliability
@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_strict_lua_keeps_its_strictness(tmp_path, policy_log, hang_guard, figures, lua):
    ms = [message("OK", arrival=1, filename="OK"), message("UNDECLARED", arrival=2, filename="UNDECLARED"),
          message("AFTER", arrival=3, filename="AFTER")]

    ok, undeclared, after = decide(tmp_path, STRICT_LATE, ms, lua=lua)

    assert ok.reason == after.reason == "strict, metatable the script's own: true"
    assert undeclared.send is False and len(undeclared.errors) == 1
    assert "variable 'undeclared_name' is not declared" in undeclared.errors[0]
    assert "worker died" not in policy_log.text
    figures.record("inputs", f"strict.lua's shape on _G, Lua {lua}", tried=1, survived=1)


@pytest.mark.reliability
@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_a_syntax_error_does_not_load_and_names_the_file_and_line(tmp_path, hang_guard, figures, lua):
    script = write_script(tmp_path, "function CheckFile(f, a)\n  return a\nend\n\nif then\n")
    with pytest.raises(ScriptLoadError) as caught:
        with PolicyEngine(settings(script, lua=lua)) as engine:
            engine.decide([message("Q1")], DEFAULT)
    text = caught.value.message
    assert str(script) in text and ":5:" in text, text
    assert "Traceback" not in text
    figures.record("inputs", f"a syntax error, Lua {lua}", tried=1, survived=1)
