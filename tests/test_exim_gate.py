"""Is Exim gated for qrunner? Judged from Exim's own configuration, on the real private Exim.

Each missing piece of the gate is removed from the instance's configuration,
and the test shows two things: Exim really lets such mail out at once (the
SMTP sink gets it, ``exim -bp -qGqrunner`` stays empty), and qrunner says so
on every run, ``-q`` included, and in ``status``.

How the ``-q`` warning is asserted: through what the qrunner command writes
to stderr (``-q`` hides everything but errors there, and the gate warning
must not be hidden by it). Where the system log gets it is the logging
rule's business (issue 10, point 1).

At the end, subprocess is mocked to reach what a real Exim will not do on
demand: an ``exim -bP`` that fails or hangs after qrunner started.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from mta_harness import EximHarness
from qrunner_e2e import ALLOW_ALL, Qrunner, make_message

NOT_GATED = "Exim is not gated for qrunner"
WAYS_OF_ASKING = (["run"], ["-q", "run"], ["run", "-q"], ["run", "--dry-run"], ["plan"])


def qrunner(tmp_path, exim, exim_sink, extra_config: str = "") -> Qrunner:
    return Qrunner(tmp_path, EximHarness(exim, exim_sink), ALLOW_ALL, extra_config=extra_config)


def status_gate_line(qr: Qrunner) -> str:
    result = qr("status")
    assert result.code == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("gated:")]
    return line


def submit_bdat(exim, recipient: str) -> None:
    """A client that sends the message with BDAT (CHUNKING), over ``exim -bs``."""
    body = b"Subject: by BDAT\r\n\r\nhello\r\n"
    script = (b"EHLO client\r\nMAIL FROM:<alice@qrunner-test.localdomain>\r\nRCPT TO:<%s>\r\nBDAT %d LAST\r\n%sQUIT\r\n"
              % (recipient.encode(), len(body), body))
    reply = exim.run(["-bs"], input=script).stdout
    assert b"250 OK id=" in reply, reply


def submit_command_line(exim) -> None:
    exim.submit("alice@qrunner-test.localdomain", ["bob@example.net"], make_message("by sendmail"))


def submit_smtp(exim) -> None:
    exim.submit_smtp("alice@qrunner-test.localdomain", ["bob@example.net"], make_message("by SMTP"))


def test_with_the_gate_in_place_nothing_is_said_and_status_says_gated_yes(tmp_path, exim, exim_sink):
    qr = qrunner(tmp_path, exim, exim_sink)
    for command in WAYS_OF_ASKING:
        result = qr(*command)
        assert result.code == 0, result.stderr
        assert NOT_GATED not in result.stderr
    assert status_gate_line(qr) == "gated: yes"


@pytest.mark.parametrize("setting, value, submit, said", [
    ("acl_not_smtp_start", None, submit_command_line,
     "command-line mail (sendmail, cron, Exim's bounces) leaves at once, without the policy: "
     "acl_not_smtp_start is not set"),
    ("acl_not_smtp_start", "acl_check_rcpt", submit_command_line,
     "acl_not_smtp_start = acl_check_rcpt does not set queue = qrunner"),
    ("acl_not_smtp", None, submit_command_line,
     "command-line mail in the queue qrunner is delivered at once, without the policy: acl_not_smtp is not set"),
    ("acl_smtp_predata", None, submit_smtp,
     "SMTP mail leaves at once, without the policy: acl_smtp_predata is not set"),
    ("chunking_advertise_hosts", None, lambda exim: submit_bdat(exim, "bob@example.net"),
     "SMTP mail sent with CHUNKING (BDAT) skips acl_smtp_predata and leaves at once: chunking_advertise_hosts = *"),
])
def test_a_missing_piece_lets_mail_out_and_every_run_says_so(tmp_path, exim, exim_sink, setting, value, submit, said):
    exim.set(**{setting: value})
    qr = qrunner(tmp_path, exim, exim_sink)

    submit(exim)

    assert len(exim_sink.wait_for(1)) == 1  # Exim delivered it at once: the gate really leaks this way
    exim.stop()  # let that delivery end
    assert exim.queue_ids() == [] and exim.queue_ids("") == []
    for command in WAYS_OF_ASKING:
        result = qr(*command)
        assert result.code == 0, result.stderr
        assert NOT_GATED in result.stderr and said in result.stderr, (command, result.stderr)
        assert "contrib/exim/README.md" in result.stderr
    line = status_gate_line(qr)
    assert line.startswith(f"gated: no ({NOT_GATED}: ") and said in line


def test_the_run_that_lists_nothing_says_why(tmp_path, exim, exim_sink):
    """The admin's finding: listed=0 while mail bypasses the policy, and nothing said."""
    exim.set(acl_not_smtp_start=None, acl_smtp_predata=None)
    qr = qrunner(tmp_path, exim, exim_sink)
    submit_command_line(exim)
    exim_sink.wait_for(1)

    result = qr("run")

    assert "run: listed=0 " in result.stderr
    assert NOT_GATED in result.stderr
    assert "acl_not_smtp_start is not set" in result.stderr and "acl_smtp_predata is not set" in result.stderr


def test_a_gate_for_another_queue_is_no_gate_for_this_one(tmp_path, exim, exim_sink):
    qr = qrunner(tmp_path, exim, exim_sink)
    qr.config_path.write_text(qr.config_path.read_text().replace('queue = "qrunner"', 'queue = "nightly"'))

    line = status_gate_line(qr)

    assert line.startswith("gated: no (") and "does not set queue = nightly" in line


def test_an_acl_called_from_the_admins_own_acl_counts(tmp_path, exim, exim_sink):
    """contrib says: merge the gate into your own ACLs; calling it with ``acl =`` is one way."""
    exim.set(acl_not_smtp_start="acl_admins_start")
    text = open(exim.config_path).read().replace("begin acl\n", "begin acl\n\nacl_admins_start:\n"
                                                                "  warn   acl = acl_qrunner_gate\n  accept\n", 1)
    with open(exim.config_path, "w") as f:
        f.write(text)
    qr = qrunner(tmp_path, exim, exim_sink)
    queue_id = exim.submit("alice@qrunner-test.localdomain", ["bob@example.net"], make_message("via the admin's ACL"))

    assert exim.queue_ids() == [queue_id]  # Exim's own listing: the called gate queued it
    assert status_gate_line(qr) == "gated: yes"


def test_an_acl_option_chosen_at_run_time_is_unknown_and_says_why(tmp_path, exim, exim_sink):
    exim.set(acl_smtp_predata="${if bool{true}{acl_qrunner_gate_smtp}{}}")
    qr = qrunner(tmp_path, exim, exim_sink)
    run = qr("run")
    assert run.code == 0 and NOT_GATED not in run.stderr  # not known to be missing: no warning
    line = status_gate_line(qr)
    assert line.startswith("gated: unknown (acl_smtp_predata = ${if bool{true}")
    assert "is expanded when Exim uses it" in line


def as_nobody(exim, *args: str) -> str:
    """An Exim command as an ordinary user (nobody), as ``qrunner status`` without root runs it."""
    result = subprocess.run(["runuser", "-u", "nobody", "--"] + exim.argv + list(args), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_users_other_than_root_see_the_acls_too(exim):
    """Exim 4.96 prints ``-bP config`` to everyone, masking only macros and ``hide`` options for non-admins."""
    from qrunner.mta import exim_gate

    options = as_nobody(exim, "-bP", *exim_gate.OPTIONS)
    config = as_nobody(exim, "-bP", "config")
    assert "acl_not_smtp_start = acl_qrunner_gate" in options and "  acl_qrunner_gate:" in config

    assert exim_gate.judge(exim_gate.read(options, config), "qrunner").gated is True
    exim.set(acl_not_smtp_start=None)
    options = as_nobody(exim, "-bP", *exim_gate.OPTIONS)
    gate = exim_gate.judge(exim_gate.read(options, as_nobody(exim, "-bP", "config")), "qrunner")
    assert gate.gated is False and "acl_not_smtp_start is not set" in gate.why


def test_config_is_printed_only_when_asked_alone(exim):
    """Why gate() makes two calls: ``-bP NAME config`` prints no configuration, ``-bP config NAME`` no NAME."""
    after = exim.run(["-bP", "acl_not_smtp", "config"]).stdout.decode()
    before = exim.run(["-bP", "config", "acl_not_smtp"]).stdout.decode()
    assert "# Exim Configuration" not in after and after.startswith("acl_not_smtp = ")
    assert before.startswith("# Exim Configuration") and before.splitlines()[-1] != "acl_not_smtp = acl_not_smtp"


ROUTED_SENDER = '[[sender]]\nid = 0\nname = "isp"\n[sender.exim]\ntransport = "relay_smtp"\n'


def contrib_router(routes_file: str) -> str:
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "contrib", "exim", "conf.d", "router", "05_qrunner_route")) as f:
        return f.read().replace("/var/lib/qrunner-exim/exim-routes", routes_file) + "\n"


def test_a_routed_sender_needs_the_router_first_reading_qrunners_routes_file(tmp_path, exim, exim_sink):
    qr = qrunner(tmp_path, exim, exim_sink)
    qr.config_path.write_text(qr.config_path.read_text() + ROUTED_SENDER)
    routes_file = os.path.normpath(qr.state_dir) + "-exim/exim-routes"  # beside state_dir (README)

    missing = status_gate_line(qr)
    assert "no router reads qrunner's routes file " + routes_file in missing
    assert "the mail of the senders with a route (isp) would leave by Exim's usual routers" in missing
    assert "contrib/exim/conf.d/router/05_qrunner_route" in missing

    exim.extra_routers = contrib_router("/var/lib/qrunner-exim/exim-routes")
    exim.write_config()
    assert "router qrunner_route reads another routes file than the one qrunner writes" in status_gate_line(qr)

    exim.extra_routers = "early:\n  driver = redirect\n  data = :defer: never\n  condition = false\n\n" + \
        contrib_router(routes_file)
    exim.write_config()
    assert "router qrunner_route, which reads qrunner's routes file, is not the first router (early comes before it)" \
        in status_gate_line(qr)

    exim.extra_routers = contrib_router(routes_file)
    exim.write_config()
    assert status_gate_line(qr) == "gated: yes"


@pytest.mark.parametrize("failure, said", [
    (subprocess.CompletedProcess([], 1, "", "Exim configuration error in line 7 of /etc/exim4/exim4.conf:\n"
                                             "  main option \"acl_smtp_prdata\" unknown\n"),
     "Exim cannot show its configuration (main option \"acl_smtp_prdata\" unknown)"),
    (subprocess.TimeoutExpired(["exim", "-bP"], 60), "exim -bP did not answer within 60 seconds"),
])
def test_an_exim_that_cannot_answer_gives_unknown_and_says_why(mocker, tmp_path, failure, said):
    from qrunner.config import EximSettings
    from qrunner.mta import exim as exim_mod

    mocker.patch.object(exim_mod, "find_exim", return_value="/usr/sbin/exim4")
    mocker.patch.object(exim_mod.EximBackend, "_options", return_value={"spool_directory": str(tmp_path),
                                                                        "split_spool_directory": "no"})
    backend = exim_mod.EximBackend(EximSettings())
    if isinstance(failure, Exception):
        mocker.patch.object(exim_mod.subprocess, "run", side_effect=failure)
    else:
        mocker.patch.object(exim_mod.subprocess, "run", return_value=failure)

    gate = backend.gate()

    assert gate.gated is None and gate.why == said
