"""Debian's split configuration with contrib's conf.d files: does the gate hold, and does qrunner see it?

The configuration is built as an admin builds it (update-exim4.conf from
conf.d with contrib's files in place), in a private directory: see
tests/exim_debian.py. What the tests expect comes from Exim itself
(``exim -bP``, ``exim -bp -qGqrunner``, its mainlog) and the SMTP sink. The
last two hold contrib/exim/README.md to the files it ships.
"""

from __future__ import annotations

import os
import tempfile

import pytest

from exim_debian import CONTRIB_FILES, DebianEximInstance, debian_missing_reason
from mta_available import skip_or_fail
from mta_harness import EximHarness
from qrunner_e2e import ALLOW_ALL, Qrunner, make_message


def debian_exim(sink, contrib_files=CONTRIB_FILES) -> DebianEximInstance:
    skip_or_fail(debian_missing_reason())
    instance = DebianEximInstance(tempfile.mkdtemp(prefix="qr-deb-", dir="/tmp"), sink.port, contrib_files)
    instance.start()  # update-exim4.conf, then exim -bV with the private binary
    return instance


@pytest.fixture
def host_etc_exim4():
    """The host's /etc/exim4 must be as it was: the private build never touches it."""
    before = os.path.exists("/etc/exim4") and sorted(os.listdir("/etc/exim4"))
    yield
    assert (os.path.exists("/etc/exim4") and sorted(os.listdir("/etc/exim4"))) == before


def test_debian_split_configuration_with_contribs_files_gates_outbound_mail(tmp_path, exim_available, exim_sink,
                                                                            host_etc_exim4):
    exim = debian_exim(exim_sink)
    try:
        assert exim.run(["-bP", "acl_not_smtp_start"]).stdout.decode().strip() == \
            "acl_not_smtp_start = acl_qrunner_gate"
        assert exim.run(["-bP", "router_list"]).stdout.decode().split()[0] == "qrunner_route"

        by_sendmail = exim.submit("alice@qrunner-test.localdomain", ["bob@example.net"], make_message("by sendmail"))
        by_smtp = exim.submit_smtp("alice@qrunner-test.localdomain", ["carol@example.org"], make_message("by SMTP"))

        assert sorted(exim.queue_ids()) == sorted([by_sendmail, by_smtp])  # exim -bp -qGqrunner
        log = exim.log_text()
        for message_id in (by_sendmail, by_smtp):
            assert f"{message_id} no immediate delivery: queued in qrunner by ACL" in log
        exim.stop()
        assert exim_sink.messages == []

        qr = Qrunner(tmp_path, EximHarness(exim, exim_sink), ALLOW_ALL)
        assert "gated: yes" in qr("status").stdout.splitlines()
        plan = qr("plan")
        assert plan.code == 0, plan.stderr
        assert by_sendmail in plan.stdout and by_smtp in plan.stdout
        assert "not gated" not in plan.stderr
    finally:
        exim.cleanup()


def test_debian_split_configuration_without_contribs_main_file_is_said(tmp_path, exim_available, exim_sink,
                                                                      host_etc_exim4):
    exim = debian_exim(exim_sink, [name for name in CONTRIB_FILES if not name.startswith("main/")])
    try:
        assert exim.run(["-bP", "acl_smtp_predata"]).stdout.decode().strip() == "acl_smtp_predata ="
        qr = Qrunner(tmp_path, EximHarness(exim, exim_sink), ALLOW_ALL)

        [line] = [line for line in qr("status").stdout.splitlines() if line.startswith("gated:")]

        assert line.startswith("gated: no (Exim is not gated for qrunner: ")
        for missing in ("acl_not_smtp_start is not set", "acl_not_smtp is not set", "acl_smtp_predata is not set",
                        "chunking_advertise_hosts = *"):
            assert missing in line
        assert "contrib/exim/conf.d/" in line
    finally:
        exim.cleanup()


CONTRIB_EXIM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "contrib", "exim")


def test_contribs_readme_lists_every_file_an_admin_installs():
    """The file table and the install lines must not drift from contrib/exim's files."""
    with open(os.path.join(CONTRIB_EXIM, "README.md")) as f:
        readme = f.read()
    table = [line for line in readme.splitlines() if line.startswith("| `")]
    shipped = [os.path.relpath(os.path.join(top, name), CONTRIB_EXIM)
               for top, _dirs, names in os.walk(CONTRIB_EXIM) for name in names if name != "README.md"]
    for path in shipped:
        assert any(f"`{path}`" in row for row in table), f"{path} is not in contrib/exim/README.md's file table"
    install_lines = [line for line in readme.splitlines() if line.startswith("install -m 644 conf.d/")]
    for name in CONTRIB_FILES:
        assert any(line.split()[3] == f"conf.d/{name}" for line in install_lines), f"no install line for conf.d/{name}"


def test_contribs_gate_test_mail_cannot_reach_a_real_address():
    with open(os.path.join(CONTRIB_EXIM, "README.md")) as f:
        submissions = [line for line in f.read().splitlines() if "| exim " in line and " -- " in line]
    assert submissions
    for line in submissions:
        recipient = line.split(" -- ", 1)[1].split()[0]
        assert recipient.endswith(".invalid"), line
