"""The way out: the removal rule (``qrunner release --for-removal``) and ``make install``/``make uninstall``.

The rule is qrunner's, so that ``make uninstall`` and a Debian package's
prerm follow the same one: refused while the MTA is still gated for qrunner
(released mail would wait behind the gate with nobody left to send it);
otherwise every qrunner hold is released and, where the MTA has a named
queue (Exim), every message in it goes to the default queue. Each case runs
over the memory back end, the private Postfix and the private Exim, and
reads the outcome from the MTA's own tools (``postqueue -j``, ``exim -bp``,
the memory queue's file), never from qrunner's records.

The install round trip goes into a scratch tree under the test's own
directory, points the installed qrunner at the private Postfix, and refuses
to run on a host where qrunner is installed for real.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import fields

import pytest

from safe_tmp import shipped

from memory_harness import MemoryHarness
from mta_harness import HELD, WAITING, EximHarness, PostfixHarness, harness_for
from qrunner_e2e import SKIP_ALL, Qrunner
from test_senders import contrib_routers

from qrunner.config import Config, EximSettings, MemorySettings, PostfixSettings, load_config, tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRIB = os.path.join(ROOT, "contrib")

# Where a real `make install` puts qrunner: the round trip will not run beside it.
REAL_INSTALL = ("/usr/local/bin/qrunner", "/opt/qrunner", "/etc/qrunner", "/etc/systemd/system/qrunner.service",
                "/etc/systemd/system/qrunner.timer", "/usr/local/share/doc/qrunner", "/etc/cron.d/qrunner",
                "/usr/local/share/man/man8/qrunner.8")

# What `release --for-removal` must name for each MTA when it refuses: how the admin takes the gate out.
UNGATE_WORDS = {"memory": ['"gated" to false'],
                "postfix": ["-X defer_transports", "reload"],
                "exim": ["05_qrunner_gate", "35_qrunner_gate", "05_qrunner_route", "update-exim4.conf",
                         "restart Exim"]}


@pytest.fixture(params=["memory", "postfix", "exim"])
def mta(request, tmp_path):
    """The memory back end (any machine), the private Postfix and the private Exim, each gated for qrunner."""
    harness = harness_for(request, tmp_path)
    if harness.name == "exim":
        # contrib's whole gate: the ACLs the instance has, and the routers (the fixture restores the config).
        harness.instance.extra_routers = contrib_routers(str(tmp_path / "state-exim" / "exim-routes"))
        harness.instance.write_config()
    return harness


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
    released = qr("release", "--for-removal")

    assert released.code == 0, released.stderr
    assert f"its records stay in {qr.state_dir}" in released.stdout
    assert all(f"{i}: action=release" in released.stderr for i in ours)
    if mta.name == "exim":
        assert mta.instance.queue_ids() == []  # exim -qGqrunner -bp: the named queue is empty
        default = {m["id"]: m["frozen"] for m in mta.instance.queue("")}  # exim -bp: the default queue
        assert default == {ours[0]: False, ours[1]: False, waiting: False, admins: True}
    elif mta.name == "memory":  # ungated, the model's MTA sends what is not held on its own schedule
        assert mta.where(admins) == HELD  # the admin's hold is the admin's
        assert {m.queue_id for m in mta.sink.wait_for(3)} == set(ours + [waiting])
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
    assert mta.where(admins) == HELD  # moved, still the admin's hold
    assert {m.queue_id for m in mta.sink.wait_for(3)} == set(ours + [waiting])  # the default queue's runners


# The memory back end with gate() patched to "cannot tell": the fact only a real MTA can leave unknown.
UNKNOWN_GATE = """
import sys
from qrunner.mta.base import Gate
from qrunner.mta.memory import MemoryBackend
MemoryBackend.gate = lambda self, senders=(): Gate(None, "its configuration could not be read")
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
    looks = [qr("release", "--for-removal", *extra) for extra in (("--dry-run",), ("--sender", "x@example.com"),
                                                                  ("--limit", "1"), ("--all",))]

    assert named.code == 64 and "takes no ids" in named.stderr
    assert alone.code == 64 and "--gate-removed goes with --for-removal" in alone.stderr
    assert all(r.code == 64 and "takes no ids, --all, selectors" in r.stderr for r in looks), looks
    assert [mta.where(i) for i in ours] == [HELD, HELD]  # a --dry-run (or a selection) never releases for removal


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
    running = {k: v for k, v in service["Service"].items() if k in (
        "Type", "ExecStart", "SuccessExitStatus", "SyslogIdentifier", "SyslogFacility", "Nice",
        "LogRateLimitIntervalSec")}  # the hardening directives: tests/test_hardening.py
    assert running == {"Type": "oneshot", "ExecStart": "/usr/local/bin/qrunner run",
                       "SuccessExitStatus": "75", "SyslogIdentifier": "qrunner",
                       "SyslogFacility": "mail", "Nice": "5",
                       "LogRateLimitIntervalSec": "0"}  # the audit trail is never thinned
    assert service["Service"]["StateDirectory"] == "qrunner"
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
    path = shipped("contrib/qrunner.toml")  # a copy strict modes accept, wherever the checkout is
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


# -- make install / make uninstall ------------------------------------------------------

FAKE_SYSTEMCTL = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/systemctl.calls"
"""


def scratch_tree(tmp_path):
    """Where the round trip installs, laid out as a host is; the directories a host has already exist."""
    root = tmp_path / "root"
    paths = {"PREFIX": root / "opt/qrunner", "BINDIR": root / "usr/local/bin", "CONFDIR": root / "etc/qrunner",
             "SYSTEMD_DIR": root / "etc/systemd/system", "DOCDIR": root / "usr/local/share/doc/qrunner",
             "MANDIR": root / "usr/local/share/man",
             "CRON_DIR": root / "etc/cron.d", "CRONTAB": tmp_path / "crontab"}
    for existing in ("BINDIR", "SYSTEMD_DIR", "CRON_DIR"):
        paths[existing].mkdir(parents=True)
    for existing in ("opt", "usr/local/share/doc", "usr/local/share/man", "var/lib"):
        (root / existing).mkdir(parents=True)
    systemctl = tmp_path / "bin" / "systemctl"
    systemctl.parent.mkdir()
    systemctl.write_text(FAKE_SYSTEMCTL)
    systemctl.chmod(0o755)
    paths["SYSTEMCTL"] = systemctl
    return root, paths


def make(target: str, paths, cwd, *extra: str) -> subprocess.CompletedProcess:
    """``make -C <repository> TARGET`` from another directory, as an admin might run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRUNNER_") and k not in ("MAKEFLAGS", "MFLAGS")}
    env["QRUNNER_TEST_NO_SYSTEM_LOG"] = "1"  # the installed qrunner must not write to this host's mail log either
    return subprocess.run(["make", "--no-print-directory", "-C", ROOT, target]
                          + [f"{name}={value}" for name, value in paths.items()] + list(extra),
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def everything_under(root) -> set:
    found = set()
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(directory, name), root))
    return found


def refuse_beside_a_real_install() -> None:
    real = [path for path in REAL_INSTALL if os.path.lexists(path)]
    if real:
        pytest.fail("qrunner is installed for real on this host (%s): the install round trip will not run "
                    "beside it" % ", ".join(real), pytrace=False)


def test_make_install_then_uninstall_leaves_only_what_it_says_it_left(tmp_path, postfix, smtp_sink):
    refuse_beside_a_real_install()
    root, paths = scratch_tree(tmp_path)
    before = everything_under(root)
    docdir, confdir, bindir = paths["DOCDIR"], paths["CONFDIR"], paths["BINDIR"]

    installed = make("install", paths, tmp_path)

    assert installed.returncode == 0, installed.stdout + installed.stderr
    command = str(bindir / "qrunner")
    assert os.readlink(command) == str(paths["PREFIX"] / "bin" / "qrunner")
    with open(confdir / "qrunner.toml") as f, open(os.path.join(CONTRIB, "qrunner.toml")) as shipped:
        assert f.read() == shipped.read()  # the MTA-neutral example, mta = "auto"
    assert (confdir / "relayout.lua").exists()
    service = unit(str(paths["SYSTEMD_DIR"] / "qrunner.service"))
    assert service["Service"]["ExecStart"] == f"{command} run"
    assert service["Unit"]["Documentation"] == f"file:{docdir}/README.md"
    assert service["Service"]["SyslogIdentifier"] == "qrunner"
    assert not (paths["SYSTEMD_DIR"] / "timers.target.wants").exists()  # installed disabled
    assert not (tmp_path / "bin" / "systemctl.calls").exists()  # nothing enabled or started
    assert os.listdir(paths["CRON_DIR"]) == []  # the cron example is a document, not a running job
    with open(docdir / "contrib" / "cron" / "qrunner") as f:
        assert f"root {command} -q run" in f.read()
    shipped = {os.path.relpath(os.path.join(d, n), ROOT) for d, _, names in os.walk(CONTRIB) for n in names}
    assert shipped | {"README.md"} == {p for p in everything_under(docdir) if os.path.isfile(docdir / p)}
    # man finds each page in MANDIR, as `man qrunner` does once MANDIR is on the manual path (/usr/local/share/man is).
    for page, wanted in (("qrunner", "man8/qrunner.8"), ("qrunner.toml", "man5/qrunner.toml.5"),
                         ("qrunner-policy", "man7/qrunner-policy.7")):
        found = subprocess.run(["man", "-w", page], capture_output=True, text=True,
                               env=dict(os.environ, MANPATH=str(paths["MANDIR"])))
        assert (found.returncode, found.stdout.strip()) == (0, str(paths["MANDIR"] / wanted)), found.stderr
    shown = subprocess.run(["man", "--nh", "qrunner"], capture_output=True, text=True,
                           env=dict(os.environ, MANPATH=str(paths["MANDIR"]), MANWIDTH="1000", PAGER="cat"))
    assert shown.returncode == 0 and "EXIT STATUS" in shown.stdout, shown.stderr
    assert f"{docdir}/contrib/" in shown.stdout  # the installed page names the installed documentation
    # systemd-analyze verify over the units make install staged, in a root with the systemd units they
    # name: not a single warning (it exits 0 on an unknown key or a misspelt value).
    analyzed = tmp_path / "analyzed"
    shutil.copytree(paths["SYSTEMD_DIR"], analyzed / "etc/systemd/system")
    shutil.copytree("/usr/lib/systemd/system", analyzed / "usr/lib/systemd/system", symlinks=True)
    (analyzed / "usr/local/bin").mkdir(parents=True)
    shutil.copy(command, analyzed / "usr/local/bin/qrunner")  # the installed command (a link into the venv)
    with open(analyzed / "etc/systemd/system/qrunner.service") as f:
        unit_text = f.read().replace(str(command), "/usr/local/bin/qrunner")
    with open(analyzed / "etc/systemd/system/qrunner.service", "w") as f:
        f.write(unit_text)
    verify = subprocess.run(["systemd-analyze", "verify", f"--root={analyzed}", "/etc/systemd/system/qrunner.service",
                             "/etc/systemd/system/qrunner.timer"], capture_output=True, text=True)
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", ""), verify.stderr

    # The admin's edits: this host's Postfix (the private one; mta stays "auto"), a policy that holds everything.
    state_dir = root / "var/lib/qrunner"
    (confdir / "qrunner.toml").write_text(textwrap.dedent(f"""\
        mta = "auto"
        state_dir = "{state_dir}"
        script = "{confdir / 'relayout.lua'}"
        [postfix]
        config_directory = "{postfix.config_directory}"
        """))
    (confdir / "relayout.lua").write_text(SKIP_ALL)
    mta = PostfixHarness(postfix, smtp_sink)
    ours = [mta.queue_message("held 1"), mta.queue_message("held 2")]
    config = ["--config", str(confdir / "qrunner.toml")]
    plan = subprocess.run([command] + config + ["plan"], capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0 and "2 messages: 0 to send" in plan.stdout, plan.stderr
    run = subprocess.run([command] + config + ["run"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert [mta.where(i) for i in ours] == [HELD, HELD]  # postqueue -j
    installed_tree = everything_under(root)

    (paths["CRON_DIR"] / "qrunner").write_text(f"*/5 * * * * root {command} -q run\n")
    cron = make("uninstall", paths, tmp_path)
    assert cron.returncode != 0 and "still starts qrunner from cron" in cron.stderr
    (paths["CRON_DIR"] / "qrunner").unlink()
    paths["CRONTAB"].write_text(f"*/5 * * * * root {command} -q run\n")  # the system crontab counts too
    in_crontab = make("uninstall", paths, tmp_path)
    assert in_crontab.returncode != 0 and "crontab still starts qrunner" in in_crontab.stderr
    paths["CRONTAB"].write_text("# */5 * * * * root qrunner -q run (commented out)\n")

    gated = make("uninstall", paths, tmp_path)

    assert gated.returncode != 0
    assert "the MTA is still gated for qrunner (defer_transports = smtp)" in gated.stderr
    assert "-X defer_transports" in gated.stderr and "nothing was released" in gated.stderr
    assert [mta.where(i) for i in ours] == [HELD, HELD]
    assert everything_under(root) == installed_tree  # nothing removed either
    assert not (tmp_path / "bin" / "systemctl.calls").exists()

    postfix.set(defer_transports="")  # the gate out: postconf -e, postfix reload
    removed = make("uninstall", paths, tmp_path)

    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert [mta.where(i) for i in ours] == [WAITING, WAITING]  # postqueue -j: released, none held
    calls = (tmp_path / "bin" / "systemctl.calls").read_text().splitlines()
    assert calls[0] in ("disable qrunner.timer", "disable --now qrunner.timer")
    left = everything_under(root) - before
    kept = {"etc/qrunner", "etc/qrunner/qrunner.toml", "etc/qrunner/relayout.lua", "var/lib/qrunner"}
    assert {p for p in left if not p.startswith("var/lib/qrunner/")} == kept
    assert f"{confdir}: your configuration and policy, as you edited them" in removed.stdout
    assert f"its records stay in {state_dir}" in removed.stdout
    assert not os.path.lexists(command) and not paths["PREFIX"].exists() and not docdir.exists()
    gone = subprocess.run(["man", "-w", "qrunner"], capture_output=True, text=True,
                          env=dict(os.environ, MANPATH=str(paths["MANDIR"])))
    assert gone.returncode != 0 and gone.stdout == ""

    again = make("uninstall", paths, tmp_path)
    assert again.returncode == 0 and "qrunner is not installed here" in again.stdout
    assert everything_under(root) - before == left


def test_a_gate_half_taken_out_still_refuses_the_removal(tmp_path, exim, exim_sink):
    """Exim with its SMTP gate removed but acl_not_smtp_start still queueing: local mail would be stranded."""
    mta = EximHarness(exim, exim_sink)
    qr, ours, admins, waiting = held_by_qrunner_and_admin(tmp_path, mta)
    exim.settings.update(acl_smtp_predata="")
    exim.write_config()

    refused = qr("release", "--for-removal")

    assert refused.code == 78, refused.stderr
    assert "acl_not_smtp_start still put mail into the queue" in refused.stderr
    assert exim.queue_ids().count(ours[0]) == 1 and exim.queue()[0]["frozen"]  # exim -bp: nothing released
