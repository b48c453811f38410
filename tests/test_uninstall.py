"""The way out: the removal rule (``qrunner release --for-removal``) and ``make install``/``make uninstall``.

The rule is qrunner's, so that ``make uninstall`` and a Debian package's
prerm follow the same one: refused while the MTA is still gated for qrunner
(released mail would wait behind the gate with nobody left to send it);
otherwise every qrunner hold is released and, where the MTA has a named
queue (Exim), every message in it goes to the default queue. Each case runs
over the memory back end, the private Postfix and the private Exim, and
reads the outcome from the MTA's own tools (``postqueue -j``, ``exim -bp``,
the memory queue's file), never from qrunner's records.

What ``make install`` ships for both MTAs is checked here too: one set of
systemd units, one cron example, one example config that shows every
setting with its default.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from dataclasses import fields

import pytest

from memory_harness import MemoryHarness
from mta_harness import HELD, WAITING, EximHarness, PostfixHarness
from qrunner_e2e import SKIP_ALL, Qrunner
from test_senders import contrib_routers

from qrunner.config import Config, EximSettings, MemorySettings, PostfixSettings, load_config, tomllib
from qrunner.mta.base import Backend
from qrunner.mta.exim import EximBackend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRIB = os.path.join(ROOT, "contrib")

# What `release --for-removal` must name for each MTA when it refuses: how the admin takes the gate out.
UNGATE_WORDS = {"memory": ['"gated" to false'],
                "postfix": ["-X defer_transports", "reload"],
                "exim": ["05_qrunner_gate", "35_qrunner_gate", "05_qrunner_route", "update-exim4.conf",
                         "restart Exim"]}


@pytest.fixture(params=["memory", "postfix", "exim"])
def mta(request, tmp_path):
    """The memory back end (any machine), the private Postfix and the private Exim, each gated for qrunner."""
    if request.param == "memory":
        return MemoryHarness(str(tmp_path / "memory-queue"))
    if request.param == "postfix":
        return PostfixHarness(request.getfixturevalue("postfix"), request.getfixturevalue("smtp_sink"))
    exim = request.getfixturevalue("exim")
    # contrib's whole gate: the ACLs the instance has, and the routers (the fixture restores the config).
    exim.extra_routers = contrib_routers(str(tmp_path / "state" / "exim-routes"))
    exim.write_config()
    return EximHarness(exim, request.getfixturevalue("exim_sink"))


def remove_gate(mta) -> None:
    """Take the gate out as the admin would, with the MTA's own tools."""
    if mta.name == "memory":
        mta.set(gated=False)
    elif mta.name == "postfix":
        mta.instance.set(defer_transports="")  # postconf -e, postfix reload
    else:
        # contrib/exim's main-section lines and routers gone: no ACL puts mail into the named queue any more.
        mta.instance.settings.update(acl_not_smtp_start="", acl_smtp_predata="")
        mta.instance.extra_routers = ""
        mta.instance.write_config()


def gate_removed_flag(mta) -> list:
    """The override for a gate qrunner cannot see: only while Exim's gate() is not implemented here.

    Exim's gate detection comes from another branch (issue 10, point 2);
    until it is merged, EximBackend.gate() answers "unknown" and the rule
    needs the admin's --gate-removed. After the merge the flag is not passed
    and the real detection decides.
    """
    return ["--gate-removed"] if mta.name == "exim" and EximBackend.gate is Backend.gate else []


def held_by_qrunner_and_admin(tmp_path, mta):
    """Two qrunner holds, an admin's hold and one message that arrived after the run."""
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    ours = [mta.queue_message("held by qrunner 1"), mta.queue_message("held by qrunner 2")]
    assert qr("run").code == 0
    admins = mta.queue_message("held by the admin")
    mta.admin_hold(admins)
    waiting = mta.queue_message("arrived after the run")
    assert [mta.where(i) for i in ours + [admins, waiting]] == [HELD, HELD, HELD, WAITING]
    return qr, ours, admins, waiting


def test_removal_is_refused_while_gated_and_releases_every_hold_once_the_gate_is_gone(tmp_path, mta):
    qr, ours, admins, waiting = held_by_qrunner_and_admin(tmp_path, mta)
    before = mta.snapshot()

    refused = qr("release", "--for-removal")

    assert refused.code == 78, refused.stderr
    assert "nothing was released" in refused.stderr and "Traceback" not in refused.stderr
    assert all(word in refused.stderr for word in UNGATE_WORDS[mta.name]), refused.stderr
    assert refused.stdout == ""
    assert mta.snapshot() == before  # the MTA's own listing: not one message moved or released

    remove_gate(mta)
    released = qr("release", "--for-removal", *gate_removed_flag(mta))

    assert released.code == 0, released.stderr
    assert f"its records stay in {qr.state_dir}" in released.stdout
    assert all(f"{i}: action=release" in released.stderr for i in ours)
    if mta.name == "exim":
        assert mta.instance.queue_ids() == []  # exim -qGqrunner -bp: the named queue is empty
        default = {m["id"]: m["frozen"] for m in mta.instance.queue("")}  # exim -bp: the default queue
        assert default == {ours[0]: False, ours[1]: False, waiting: False, admins: True}
    else:
        assert {i: mta.where(i) for i in ours + [waiting, admins]} == {
            ours[0]: WAITING, ours[1]: WAITING, waiting: WAITING, admins: HELD}  # the admin's hold is the admin's
    assert "holds in" in qr("status").stdout and f"{ours[0]}" not in qr("status").stdout


def test_removal_over_a_named_queue_empties_it_into_the_default_queue(tmp_path):
    mta = MemoryHarness(str(tmp_path / "memory-queue"))
    mta.set(named_queue=True)
    qr, ours, admins, waiting = held_by_qrunner_and_admin(tmp_path, mta)
    mta.set(gated=False)

    result = qr("release", "--for-removal")

    assert result.code == 0, result.stderr
    assert sorted(mta.sink._queue()["default_queue"]) == sorted(ours + [admins, waiting])
    assert mta.where(admins) == HELD and mta.where(ours[0]) == WAITING


# The memory back end with gate() patched to "cannot tell": the fact only a real MTA can leave unknown.
UNKNOWN_GATE = """
import sys
from qrunner.mta.base import Gate
from qrunner.mta.memory import MemoryBackend
MemoryBackend.gate = lambda self: Gate(None, "its configuration could not be read")
from qrunner.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_gate_qrunner_cannot_see_is_refused_until_the_admin_says_it_is_gone(tmp_path):
    mta = MemoryHarness(str(tmp_path / "memory-queue"))
    qr, ours, admins, waiting = held_by_qrunner_and_admin(tmp_path, mta)
    before = mta.snapshot()
    wrapper = tmp_path / "unknown_gate.py"
    wrapper.write_text(UNKNOWN_GATE)

    def unknown(*args):
        return subprocess.run([sys.executable, str(wrapper)] + list(args), env=qr._env(), capture_output=True,
                              text=True, timeout=60)

    refused = unknown("release", "--for-removal")
    assert refused.returncode == 78, refused.stderr
    assert "cannot tell whether the MTA is still gated" in refused.stderr
    assert "its configuration could not be read" in refused.stderr and "--gate-removed" in refused.stderr
    assert mta.snapshot() == before

    released = unknown("release", "--for-removal", "--gate-removed")
    assert released.returncode == 0, released.stderr
    assert [mta.where(i) for i in ours + [admins]] == [WAITING, WAITING, HELD]


def test_the_removal_rule_takes_no_queue_ids_and_the_override_no_other_release(tmp_path):
    mta = MemoryHarness(str(tmp_path / "memory-queue"))
    qr, ours, _, _ = held_by_qrunner_and_admin(tmp_path, mta)
    mta.set(gated=False)

    named = qr("release", "--for-removal", ours[0])
    alone = qr("release", "--all", "--gate-removed")

    assert named.code == 64 and "name no queue ids" in named.stderr
    assert alone.code == 64 and "--gate-removed goes with --for-removal" in alone.stderr
    assert [mta.where(i) for i in ours] == [HELD, HELD]


# -- what make install ships -------------------------------------------------------


def unit(path: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read(path)
    return parser


def test_the_units_are_the_mta_neutral_oneshot_and_its_five_minute_timer():
    service = unit(os.path.join(CONTRIB, "systemd", "qrunner.service"))
    timer = unit(os.path.join(CONTRIB, "systemd", "qrunner.timer"))

    assert service["Unit"]["After"].split() == ["postfix.service", "exim4.service"]
    assert dict(service["Service"]) == {"Type": "oneshot", "ExecStart": "/usr/local/bin/qrunner run",
                                        "SuccessExitStatus": "75", "SyslogIdentifier": "qrunner",
                                        "SyslogFacility": "mail", "Nice": "5"}
    assert dict(timer["Timer"]) == {"OnCalendar": "*:0/5", "Persistent": "true"}
    assert dict(timer["Install"]) == {"WantedBy": "timers.target"}
    assert not os.path.exists(os.path.join(CONTRIB, "systemd", "qrunner.service.d"))
    for mta in ("postfix", "exim"):  # one set of units and one cron example, for both MTAs
        assert not [f for f in os.listdir(os.path.join(CONTRIB, mta)) if f.startswith("qrunner.")]


def test_the_cron_example_runs_qrunner_quietly_every_five_minutes_as_root():
    with open(os.path.join(CONTRIB, "cron", "qrunner")) as f:
        entries = [line.split(None, 6) for line in f if line.strip() and not line.startswith("#")]
    assert entries == [["*/5", "*", "*", "*", "*", "root", "/usr/local/bin/qrunner -q run\n"]]


def uncommented(text: str) -> str:
    """The example with every commented-out table and ``key = value`` line uncommented."""
    lines = []
    for line in text.splitlines():
        match = re.match(r"# ?(\[\[?[\w.]+\]\]?|\w+ = .*)$", line)
        lines.append(match.group(1) if match else line)
    return "\n".join(lines) + "\n"


def commented_settings(text: str) -> dict:
    """The settings the example shows commented out, before its senders, as TOML reads them uncommented."""
    return tomllib.loads(uncommented(text.split("# Senders")[0]))


def test_the_example_config_is_mta_neutral_and_shows_every_setting_with_its_default(tmp_path):
    path = os.path.join(CONTRIB, "qrunner.toml")
    with open(path) as f:
        text = f.read()

    assert load_config(path) == Config(path=path)  # as shipped: the defaults, mta = "auto"
    assert re.search(r'^mta = "auto"$', text, re.M)
    shown = commented_settings(text)
    tables = {"postfix": PostfixSettings(), "exim": EximSettings(), "memory": MemorySettings()}
    top = {f.name for f in fields(Config)} - set(tables) - {"senders", "path"}
    assert set(shown) == top | set(tables)
    for name in top:
        assert shown[name] == getattr(Config(), name), name
    for table, defaults in tables.items():
        assert set(shown[table]) == {f.name for f in fields(defaults)}, table
        for name, value in shown[table].items():
            default = getattr(defaults, name)
            assert default is None or value == default, f"[{table}] {name}"  # None: found on the host, an example
    everything = tmp_path / "uncommented.toml"
    everything.write_text(uncommented(text))  # the senders uncommented too: still a valid configuration
    assert [s.name for s in load_config(str(everything)).senders] == ["isp", "backup"]
