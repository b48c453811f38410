"""The configuration file: where it is found, what it may hold, what overrides it.

Observed through ``qrunner plan``/``check``: a setting counts when the
plan's decisions show it took effect.
"""

from __future__ import annotations

import pytest

from policy_helpers import (no_default_config, plan_json, record, run_cli, run_qrunner, write_config,  # noqa: F401
                            write_script, write_snapshot)

pytestmark = pytest.mark.usefixtures("no_default_config")

# Reports which sender decided, the Lua version, and errors for filename "error".
PROBE = """
function CheckFile(f, a)
  if f == "error" then error("probe error") end
  if f == "loop" then while true do end end
  if f == "bomb" then local t = {} for i = 1, 1e9 do t[i] = string.rep("x", 64) .. i end end
  if senderid < 5 then a.SkipSend = true a.Reason = _VERSION end
  return a
end
"""


@pytest.fixture
def probe(tmp_path):
    return write_script(tmp_path, PROBE, "probe.lua")


@pytest.fixture
def snapshot(tmp_path):
    return write_snapshot(tmp_path, [record("Q1")])


def plan(capsys, args):
    return plan_json(capsys, list(args))


def assert_config_error(code, out, err, *fragments):
    assert code == 78, err
    assert out == ""
    assert err.startswith("qrunner: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# -- finding the file ---------------------------------------------------------------


def test_defaults_apply_without_a_config_file(capsys, tmp_path, probe, snapshot):
    code, decisions, err = plan(capsys, ["plan", "--queue-file", snapshot, "--script", probe])
    assert code == 0
    assert decisions[0]["reason"] == "Lua 5.4"  # lua defaults to 5.4, one sender 0:default
    assert decisions[0]["action"] == "skip"


def test_config_named_by_option(capsys, tmp_path, probe, snapshot):
    config = write_config(tmp_path, f'script = "{probe}"\nlua = "5.2"\n')
    code, decisions, err = plan(capsys, ["--config", config, "plan", "--queue-file", snapshot])
    assert (code, decisions[0]["reason"]) == (0, "Lua 5.2")


def test_config_named_by_environment(capsys, tmp_path, probe, snapshot, monkeypatch):
    config = write_config(tmp_path, f'script = "{probe}"\nlua = "5.3"\n')
    monkeypatch.setenv("QRUNNER_CONFIG", str(config))
    code, decisions, err = plan(capsys, ["plan", "--queue-file", snapshot])
    assert (code, decisions[0]["reason"]) == (0, "Lua 5.3")


def test_config_option_wins_over_environment(capsys, tmp_path, probe, snapshot, monkeypatch):
    monkeypatch.setenv("QRUNNER_CONFIG", str(write_config(tmp_path, f'script = "{probe}"\nlua = "5.3"\n', "env.toml")))
    option = write_config(tmp_path, f'script = "{probe}"\nlua = "5.1"\n', "option.toml")
    code, decisions, err = plan(capsys, ["--config", option, "plan", "--queue-file", snapshot])
    assert (code, decisions[0]["reason"]) == (0, "Lua 5.1")


def test_config_in_a_real_process_through_the_environment(tmp_path, probe, snapshot):
    config = write_config(tmp_path, f'script = "{probe}"\nlua = "5.5"\n[[sender]]\nid = 7\nname = "relay"\n')
    result = run_qrunner(["plan", "--queue-file", snapshot, "--format", "json"], env={"QRUNNER_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert b'"sender_name": "relay"' in result.stdout and b'"sender_id": 7' in result.stdout


def test_a_missing_file_named_by_option_is_an_error(capsys, tmp_path, probe, snapshot):
    missing = tmp_path / "nope.toml"
    code, out, err = run_cli(capsys, ["--config", missing, "plan", "--queue-file", snapshot, "--script", probe])
    assert_config_error(code, out, err, str(missing), "not found")


def test_a_missing_file_named_by_environment_is_an_error(capsys, tmp_path, probe, snapshot, monkeypatch):
    missing = tmp_path / "nope.toml"
    monkeypatch.setenv("QRUNNER_CONFIG", str(missing))
    code, out, err = run_cli(capsys, ["plan", "--queue-file", snapshot, "--script", probe])
    assert_config_error(code, out, err, str(missing))


def test_invalid_toml_is_an_error(capsys, tmp_path, probe, snapshot):
    config = write_config(tmp_path, 'lua = "5.4\n')
    code, out, err = run_cli(capsys, ["--config", config, "plan", "--queue-file", snapshot, "--script", probe])
    assert_config_error(code, out, err, str(config), "TOML")


def test_a_config_error_stops_check_too(capsys, tmp_path, probe):
    config = write_config(tmp_path, "colour = 1\n")
    code, out, err = run_cli(capsys, ["--config", config, "check", "--script", probe])
    assert_config_error(code, out, err, "colour")


# -- keys and types ------------------------------------------------------------------


def test_every_known_key_is_accepted(capsys, tmp_path, probe, snapshot):
    config = write_config(tmp_path, f"""
mta = "postfix"
script = "{probe}"
state_dir = "{tmp_path / 'state'}"
on_script_error = "send"
script_timeout = 1
script_memory_mb = 32
lua = "5.4"

[postfix]
config_directory = "/etc/postfix"
command_directory = "/usr/sbin"

[[sender]]
id = 0
name = "isp"
""")
    code, decisions, err = plan(capsys, ["--config", config, "plan", "--queue-file", snapshot])
    assert code == 0, err
    assert decisions[0]["reason"] == "Lua 5.4"


@pytest.mark.parametrize("text, key", [
    ("colour = 1\n", "colour"),
    ("Script = '/x.lua'\n", "Script"),
    ("[exim2]\nbinary = 'x'\n", "exim2"),
    ("[postfix]\nqueue_directory = '/var/spool/postfix'\n", "postfix.queue_directory"),
    ("[[sender]]\nid = 0\nname = 'a'\nroute = 'x'\n", "route"),
])
def test_an_unknown_key_is_an_error_naming_it(capsys, tmp_path, probe, snapshot, text, key):
    config = write_config(tmp_path, text)
    code, out, err = run_cli(capsys, ["--config", config, "plan", "--queue-file", snapshot, "--script", probe])
    assert_config_error(code, out, err, str(config), key, "not a known setting")


@pytest.mark.parametrize("text, key", [
    ("mta = 1\n", "mta"),
    ("mta = 'sendmail'\n", "mta"),
    ("script = 5\n", "script"),
    ("state_dir = false\n", "state_dir"),
    ("on_script_error = 'ignore'\n", "on_script_error"),
    ("on_script_error = true\n", "on_script_error"),
    ("script_timeout = 'fast'\n", "script_timeout"),
    ("script_timeout = 0\n", "script_timeout"),
    ("script_timeout = -1.5\n", "script_timeout"),
    ("script_timeout = true\n", "script_timeout"),
    ("script_memory_mb = 1.5\n", "script_memory_mb"),
    ("script_memory_mb = 0\n", "script_memory_mb"),
    ("script_memory_mb = '64'\n", "script_memory_mb"),
    ("lua = 5.4\n", "lua"),
    ("lua = '5.0'\n", "lua"),
    ("sender = 'isp'\n", "sender"),
    ("[[sender]]\nid = '0'\nname = 'a'\n", "id"),
    ("[[sender]]\nid = -1\nname = 'a'\n", "id"),
    ("[[sender]]\nid = true\nname = 'a'\n", "id"),
    ("[[sender]]\nname = 'a'\n", "id"),
    ("[[sender]]\nid = 0\n", "name"),
    ("[[sender]]\nid = 0\nname = ''\n", "name"),
    ("[[sender]]\nid = 0\nname = 5\n", "name"),
    ("[postfix]\nconfig_directory = 5\n", "postfix.config_directory"),
    ("postfix = 'yes'\n", "postfix"),
    ("[exim]\noverlap_priorities = 'yes'\n", "exim.overlap_priorities"),
    ("[exim]\noverlap_priorities = 1\n", "exim.overlap_priorities"),
])
def test_a_wrong_type_or_value_is_an_error_naming_the_key(capsys, tmp_path, probe, snapshot, text, key):
    config = write_config(tmp_path, text)
    code, out, err = run_cli(capsys, ["--config", config, "plan", "--queue-file", snapshot, "--script", probe])
    assert_config_error(code, out, err, str(config), key)


@pytest.mark.parametrize("text, fragment", [
    ("[[sender]]\nid = 0\nname = 'a'\n[[sender]]\nid = 0\nname = 'b'\n", "id 0"),
    ("[[sender]]\nid = 0\nname = 'a'\n[[sender]]\nid = 1\nname = 'a'\n", "name a"),
])
def test_duplicate_senders_are_an_error(capsys, tmp_path, probe, snapshot, text, fragment):
    config = write_config(tmp_path, text)
    code, out, err = run_cli(capsys, ["--config", config, "plan", "--queue-file", snapshot, "--script", probe])
    assert_config_error(code, out, err, fragment)


# -- what each setting does ------------------------------------------------------------


def test_sender_tables_give_the_senders_in_id_order(capsys, tmp_path, probe):
    script = write_script(tmp_path, "function CheckFile(f, a) if f ~= sendername then a.SkipSend = true "
                                    "a.Reason = 'not ' .. sendername end return a end")
    config = write_config(tmp_path, f"""
script = "{script}"
[[sender]]
id = 5
name = "night"
[[sender]]
id = 2
name = "day"
""")
    snapshot = write_snapshot(tmp_path, [record("N", arrival=1, filename="night"), record("D", arrival=2, filename="day"),
                                         record("X", arrival=3, filename="x")])
    code, decisions, err = plan(capsys, ["--config", config, "plan", "--queue-file", snapshot])
    assert [(d["queue_id"], d["sender_id"], d["sender_name"]) for d in decisions] == [
        ("N", 5, "night"), ("D", 2, "day"), ("X", None, None)]
    assert decisions[2]["reason"] == "day: not day; night: not night"


def test_on_script_error_from_the_file(capsys, tmp_path, probe):
    snapshot = write_snapshot(tmp_path, [record("E", filename="error")])
    config = write_config(tmp_path, f'script = "{probe}"\non_script_error = "send"\n')
    code, decisions, err = plan(capsys, ["--config", config, "plan", "--queue-file", snapshot])
    assert code == 1 and decisions[0]["action"] == "send" and decisions[0]["priority"] == 50


def test_script_timeout_from_the_file(capsys, tmp_path, probe):
    snapshot = write_snapshot(tmp_path, [record("L", filename="loop")])
    config = write_config(tmp_path, f'script = "{probe}"\nscript_timeout = 0.3\n')
    code, decisions, err = plan(capsys, ["--config", config, "plan", "--queue-file", snapshot])
    assert code == 1 and decisions[0]["errors"] == ["CheckFile did not return within 0.3 s"]


def test_script_memory_mb_from_the_file(capsys, tmp_path, probe):
    snapshot = write_snapshot(tmp_path, [record("B", filename="bomb")])
    config = write_config(tmp_path, f'script = "{probe}"\nscript_memory_mb = 16\nscript_timeout = 20\n')
    code, decisions, err = plan(capsys, ["--config", config, "plan", "--queue-file", snapshot])
    assert code == 1 and "16 MB" in decisions[0]["errors"][0]


def test_the_configured_script_must_exist(capsys, tmp_path, snapshot):
    missing = tmp_path / "gone.lua"
    config = write_config(tmp_path, f'script = "{missing}"\n')
    code, out, err = run_cli(capsys, ["--config", config, "plan", "--queue-file", snapshot])
    assert_config_error(code, out, err, str(missing))


# -- command-line flags override the file ----------------------------------------------


def test_flags_override_the_file(capsys, tmp_path, probe):
    other = write_script(tmp_path, "function CheckFile(f, a) error('wrong script used') end", "other.lua")
    config = write_config(tmp_path, f"""
script = "{other}"
lua = "5.1"
on_script_error = "skip"
[[sender]]
id = 0
name = "from-file"
""")
    snapshot = write_snapshot(tmp_path, [record("OK", arrival=1), record("E", arrival=2, filename="error")])
    code, decisions, err = plan(capsys, ["--config", config, "plan", "--queue-file", snapshot, "--script", probe,
                                         "--lua", "5.3", "--on-script-error", "send", "--sender", "9:from-flag"])
    assert code == 1
    by_id = {d["queue_id"]: d for d in decisions}
    assert by_id["OK"]["sender_name"] == "from-flag" and by_id["OK"]["sender_id"] == 9  # senderid 9 sends
    assert by_id["E"]["action"] == "send" and "probe error" in by_id["E"]["errors"][0]


def test_lua_flag_overrides_the_file(capsys, tmp_path, probe, snapshot):
    config = write_config(tmp_path, f'script = "{probe}"\nlua = "5.1"\n')
    code, decisions, err = plan(capsys, ["--config", config, "plan", "--queue-file", snapshot, "--lua", "5.5"])
    assert decisions[0]["reason"] == "Lua 5.5"


# -- senders' routes (several senders) -------------------------------------------

ROUTED = """
[[sender]]
id = 0
name = "isp"
[sender.postfix]
listener = "127.0.0.1:10026"
transport = "relay-isp"
nexthop = "[smtp.isp.example]:587"
[sender.exim]
transport = "isp_smtp"
[[sender]]
id = 1
name = "backup"
default = true
"""


def test_sender_routes_are_read(tmp_path):
    from qrunner.config import load_config

    path = tmp_path / "qrunner.toml"
    path.write_text(ROUTED)
    isp, backup = load_config(str(path)).senders
    assert isp.postfix.address == ("127.0.0.1", 10026)
    assert isp.postfix.content_filter == "relay-isp:[smtp.isp.example]:587"
    assert isp.exim.transport == "isp_smtp" and not isp.default
    assert backup.default and backup.postfix is None


@pytest.mark.parametrize("change, fragment", [
    (('listener = "127.0.0.1:10026"\n', ''), "sender #1.postfix.listener' is missing"),
    (('listener = "127.0.0.1:10026"', 'listener = "localhost"'), "must be host:port"),
    (('transport = "relay-isp"', 'transport = "a b"'), "master.cf service name"),
    (('nexthop = "[smtp.isp.example]:587"', 'nexthop = "a, b"'), "one next hop"),
    (('transport = "isp_smtp"', 'transport = 5'), "sender #1.exim"),
    (('name = "isp"\n', 'name = "isp"\ndefault = true\n'), "at most one sender"),
    (('default = true', 'default = "yes"'), "sender #2.default"),
    (('[sender.exim]', '[sender.sendmail]'), "sender #1.sendmail"),
])
def test_inconsistent_sender_routes_are_config_errors(capsys, tmp_path, change, fragment):
    from qrunner.cli import main

    path = tmp_path / "qrunner.toml"
    path.write_text(ROUTED.replace(*change))
    assert main(["--config", str(path), "check", "--script", str(tmp_path / "x.lua")]) == 78
    assert fragment in capsys.readouterr().err


def test_one_sender_without_a_route_is_the_default(tmp_path):
    from qrunner.config import load_config

    path = tmp_path / "qrunner.toml"
    path.write_text('[[sender]]\nid = 3\nname = "only"\n')
    (only,) = load_config(str(path)).senders
    assert only.default
