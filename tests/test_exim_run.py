"""End to end against a real (private) Exim with qrunner's gate: the cases only Exim has.

The cases both MTAs share are in test_run.py. Here: Exim missing, qrunner's
own retry pacing for the named queue, waiting for Exim's retry time after a
relay outage and the admin's forced flush past it (never past a freeze),
priority levels reaching the relay one after the other, the way out
(release --all --to-default-queue), handing too-old mail back to Exim's
retry rules, and bounces that Exim generates into the named queue.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import time

from mta_harness import HELD, WAITING, EximHarness
from qrunner_e2e import ALLOW_ALL, SKIP_ALL, Qrunner

PRIORITY_FROM_SUBJECT = ('function CheckFile(f, a, s, c, rp, r, h)\n'
                         '  a.Priority = tonumber(h.subject:match("^p(%d+)")) or 50\n'
                         '  return a\nend\n')


def harness(exim, exim_sink):
    return EximHarness(exim, exim_sink)


def test_exim_missing_exits_69(tmp_path, exim, exim_sink):
    mta = harness(exim, exim_sink)
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    qr.config_path.write_text(qr.config_path.read_text().replace(f'binary = "{exim.binary}"',
                                                                  'binary = "/nonexistent/exim4"'))
    queue_id = mta.queue_message("x")

    result = qr("run")

    assert result.code == 69
    assert "Exim is not installed" in result.stderr and "Traceback" not in result.stderr
    assert mta.where(queue_id) == WAITING


def test_without_spool_directory_in_qrunner_toml_exim_tells_the_spool_and_its_split(tmp_path, exim, exim_sink):
    """[exim] spool_directory unset: Exim's own ``-bP`` names the spool (and split_spool_directory), and a run on
    a split spool holds exactly the queue ``exim -bp`` lists."""
    exim.settings["split_spool_directory"] = "true"
    exim.write_config()
    mta = harness(exim, exim_sink)
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    qr.config_path.write_text(qr.config_path.read_text().replace(f'spool_directory = "{exim.spool_directory}"\n',
                                                                  ""))
    assert "spool_directory =" not in qr.config_path.read_text()
    queued = [mta.queue_message(f"split {n}") for n in range(3)]
    assert any(os.path.isdir(os.path.join(exim.spool_directory, exim.queue_name, "input", q[5])) for q in queued)

    plan = qr("plan", "--format", "json")
    assert plan.code == 0, plan.stderr
    assert sorted(d["queue_id"] for d in json.loads(plan.stdout)["decisions"]) == \
        sorted(entry["id"] for entry in exim.queue())
    run = qr("run")
    assert run.code == 0, run.stderr
    assert [mta.where(q) for q in queued] == [HELD] * 3


SAYS_FILE_AND_SUBJECT = ('function CheckFile(f, a, s, c, rp, r, h)\n'
                         '  print("seen " .. f .. "|" .. (h.subject or "")); return a\nend\n')


def test_on_a_split_spool_the_policy_gets_each_messages_own_data_file_and_headers(tmp_path, exim, exim_sink):
    """Filename (the -D file) and the headers come from where each message's files are: in its split
    sub-directory, or in input/ itself for mail queued before split_spool_directory was turned on (Exim
    finds both)."""
    mta = harness(exim, exim_sink)
    before = mta.queue_message("queued before the split")
    exim.settings["split_spool_directory"] = "true"
    exim.write_config()
    split = [mta.queue_message(f"split {n}") for n in range(3)]
    on_disk = {q: p for q in [before] + split
               for p in glob.glob(os.path.join(exim.spool_directory, exim.queue_name, "input", "**", q + "-D"),
                                  recursive=True)}
    assert os.path.dirname(on_disk[before]).endswith("/input") and all(
        os.path.basename(os.path.dirname(on_disk[q])) == q[5] for q in split)

    plan = Qrunner(tmp_path, mta, SAYS_FILE_AND_SUBJECT)("plan")

    assert plan.code == 0, plan.stderr
    seen = dict(line.split("seen ", 1)[1].split("|") for line in plan.stderr.splitlines() if "seen " in line)
    by_exim = {on_disk[q]: next(h for h in exim.headers_mvh(q) if h.lower().startswith(b"subject:"))[8:].strip()
               .decode() for q in on_disk}  # the subject as exim -Mvh shows each message's headers
    assert seen == by_exim and sorted(by_exim.values()) == ["queued before the split", "split 0", "split 1",
                                                            "split 2"]


def test_a_deferred_dispatch_waits_for_qrunners_backoff(tmp_path, exim, exim_sink):
    """A 4xx to RCPT leaves Exim only an address record (R:), which -Mc ignores: qrunner's backoff paces it."""
    mta = harness(exim, exim_sink)
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    exim_sink.defer_rcpt = {"bob@example.net"}
    queue_id = mta.queue_message("relay says later")

    first = qr("run")
    assert first.code == 0, first.stderr
    assert f"{queue_id}: action=send sender=default priority=50 result=deferred" in first.stderr
    assert mta.where(queue_id) == WAITING
    assert [key[:2] for key in exim.retry_records()] == ["R:"]

    second = qr("run")
    assert (f'{queue_id}: action=wait sender=default priority=50 next_retry=' in second.stderr
            and ' reason="qrunner\'s retry time (backoff after 1 deferred dispatch)"' in second.stderr)
    assert "action=send" not in second.stderr
    polite = qr("flush", queue_id)  # without --ignore-policy, the backoff holds for flush too
    assert f"{queue_id}: action=wait" in polite.stderr and "action=send" not in polite.stderr
    plan = qr("plan")
    assert "waits for qrunner's retry time" in plan.stdout

    exim_sink.defer_rcpt = set()
    forced = qr("flush", queue_id, "--ignore-policy")
    assert forced.code == 0, forced.stderr
    assert [m.header("Subject") for m in exim_sink.wait_for(1)] == [b"relay says later"]
    mta.wait_gone(queue_id)


def test_after_a_relay_outage_a_run_waits_for_exims_retry_time_and_a_forced_flush_goes_past_it(tmp_path, exim,
                                                                                             exim_sink):
    """-Mc respects Exim's host retry record: plan and the log say so; flush --ignore-policy (-qf) delivers anyway."""
    mta = harness(exim, exim_sink)
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    queue_id = mta.queue_message("sent during the outage")
    exim_sink.stop()  # the relay is down: connection refused
    try:
        first = qr("run")
    finally:
        exim_sink.start()
    assert f"{queue_id}: action=send sender=default priority=50 result=deferred" in first.stderr
    key = f"T:127.0.0.1:127.0.0.1:{exim_sink.port}"
    error, next_try = exim.retry_records()[key]  # Exim's own record of the host, as exim_dumpdb shows it
    assert next_try > time.time() + 600  # Debian's 15 minutes, longer than qrunner's 300 s backoff
    exim_retry = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(next_try))

    [planned] = json.loads(qr("plan", "--format", "json").stdout)["decisions"]
    assert planned["next_retry"] == exim_retry
    assert planned["next_retry_reason"] == f"Exim's retry time (retry record {key}: {error})"
    table = qr("plan").stdout
    assert f"waits for Exim's retry time {exim_retry[11:]} (retry record {key}: {error})" in table
    second = qr("run")  # the relay is back, but -Mc would not try it before Exim's retry time
    assert second.code == 0, second.stderr
    assert (f'{queue_id}: action=wait sender=default priority=50 next_retry={exim_retry} '
            f'reason="Exim\'s retry time (retry record {key}: {error})"') in second.stderr
    assert "action=send" not in second.stderr and exim_sink.messages == []
    assert mta.where(queue_id) == WAITING

    forced = qr("flush", queue_id, "--ignore-policy")

    assert forced.code == 0, forced.stderr
    assert f"{queue_id}: action=send sender=default priority=50 policy=overridden result=delivered" in forced.stderr
    assert [mta.exim_id(m) for m in exim_sink.wait_for(1)] == [queue_id]
    assert re.search(rf"^\S+ \S+ {queue_id} => bob@example.net .*Q=qrunner", exim.log_text(), re.M)
    assert queue_id not in exim.queue_ids()


def test_a_forced_flush_never_delivers_a_message_the_admin_froze_after_qrunner_looked(tmp_path, exim, exim_sink,
                                                                                     mocker, capsys):
    """The admin freezes it in the last moment, after qrunner's own check: Exim's queue run (-qf) still skips it."""
    from qrunner.cli import main
    from qrunner.mta.exim import EximBackend

    mta = harness(exim, exim_sink)
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    queue_id = mta.queue_message("frozen at the last moment")
    exim_sink.stop()
    try:
        assert qr("run").code == 0  # deferred: Exim now has a retry record for the relay
    finally:
        exim_sink.start()
    start = EximBackend._start

    def admin_freezes_first(backend, batch):
        exim.freeze(batch.ids)  # exim -Mf, between qrunner's last look at the spool and Exim's start
        return start(backend, batch)

    mocker.patch.object(EximBackend, "_start", admin_freezes_first)

    code = main(["--config", str(qr.config_path), "flush", queue_id, "--ignore-policy"])

    assert code == 1
    assert f"{queue_id}: action=send sender=default failed: frozen by someone else" in capsys.readouterr().err
    assert exim.queue() and exim.queue()[0]["id"] == queue_id and exim.queue()[0]["frozen"]
    assert exim_sink.messages == []
    assert f"{queue_id} Message is frozen" in exim.log_text()


def test_priority_levels_reach_the_relay_in_order_one_level_after_the_other(tmp_path, exim, exim_sink):
    """12 at p90 and 12 at p50, batches of 10, two Exim processes: no p50 batch starts while a p90 one delivers."""
    mta = harness(exim, exim_sink)
    qr = Qrunner(tmp_path, mta, PRIORITY_FROM_SUBJECT)
    levels = {mta.queue_message(f"p{priority} #{n}"): priority
              for n in range(12) for priority in (50, 90)}  # they arrive mixed

    result = qr("run")

    assert result.code == 0, result.stderr
    arrivals = [levels[mta.exim_id(m)] for m in exim_sink.wait_for(24)]
    assert arrivals == [90] * 12 + [50] * 12, arrivals


def test_with_overlap_priorities_levels_may_interleave_but_each_batch_keeps_its_order(tmp_path, exim, exim_sink):
    """overlap_priorities = true: a p50 batch may start beside a p90 one; what still holds is asserted."""
    mta = harness(exim, exim_sink)
    qr = Qrunner(tmp_path, mta, PRIORITY_FROM_SUBJECT)
    qr.config_path.write_text(qr.config_path.read_text() + "overlap_priorities = true\n")
    levels = {mta.queue_message(f"p{priority} #{n}"): priority
              for n in range(12) for priority in (50, 90)}
    dispatch = sorted(levels, key=lambda i: (-levels[i], mta.arrival(i), i))  # DESIGN.md's dispatch order
    batches = [dispatch[0:10], dispatch[10:12], dispatch[12:22], dispatch[22:24]]  # 10 a batch, one level each

    result = qr("run")

    assert result.code == 0, result.stderr
    arrived = [mta.exim_id(m) for m in exim_sink.wait_for(24)]
    assert sorted(arrived) == sorted(levels)
    for batch in batches:  # one Exim process delivers its batch one message after the other
        assert [i for i in arrived if i in batch] == batch
    assert levels[arrived[0]] == 90  # the first p50 batch waits for a free process: a p90 batch ended first


def test_release_all_to_default_queue_leaves_nothing_behind(tmp_path, exim, exim_sink):
    mta = harness(exim, exim_sink)
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    held = mta.queue_message("held by qrunner")
    assert qr("run").code == 0
    waiting = mta.queue_message("arrived after the run")
    admins = mta.queue_message("frozen by the admin")
    mta.admin_hold(admins)

    result = qr("release", "--all", "--to-default-queue")

    assert result.code == 0, result.stderr
    assert exim.queue_ids() == []  # qrunner's named queue is empty
    default = {m["id"]: m for m in exim.queue("")}
    assert set(default) == {held, waiting, admins}
    assert not default[held]["frozen"] and not default[waiting]["frozen"]
    assert default[admins]["frozen"]  # moved, but the admin's freeze is the admin's
    assert "release: released=1 moved=3 seconds=" in result.stderr  # what left the named queue is counted
    assert "released=1 moved=3" in qr("status").stdout


def test_a_bad_message_id_names_the_listing_of_qrunners_queue(tmp_path, exim, exim_sink):
    qr = Qrunner(tmp_path, harness(exim, exim_sink), ALLOW_ALL)
    result = qr("flush", "not-an-id")
    assert result.code == 64
    assert f"check it in qrunner's queue listing ('{exim.binary} -C {exim.config_path} -bp -qG{exim.queue_name}')" \
        in result.stderr
    listed = subprocess.run(exim.argv + ["-bp", f"-qG{exim.queue_name}"], capture_output=True, text=True)
    assert listed.returncode == 0  # the hint is a command that works


def test_to_default_queue_is_refused_for_postfix(tmp_path, postfix):
    qr = Qrunner(tmp_path, postfix, ALLOW_ALL)
    result = qr("release", "--all", "--to-default-queue")
    assert result.code == 64 and "Exim" in result.stderr


def test_old_mail_goes_back_to_exim_but_qrunners_holds_stay_with_a_warning(tmp_path, exim, exim_sink):
    mta = harness(exim, exim_sink)
    qr = Qrunner(tmp_path, mta, 'function CheckFile(f, a, s, c, rp, r, h)\n'
                                '  if h.subject == "policy hold" then a.SkipSend = 1; a.Reason = "held" end\n'
                                '  return a\nend\n')
    exim_sink.defer_rcpt = {"later@example.net"}
    held = mta.queue_message("policy hold")
    waiting = mta.queue_message("relay defers", to=("later@example.net",))
    admins = mta.queue_message("admin froze this")
    mta.admin_hold(admins)
    assert qr("run").code == 0
    assert mta.where(held) == HELD and mta.where(waiting) == WAITING
    time.sleep(2.1)
    qr.config_path.write_text(qr.config_path.read_text() + "max_queue_time = 1\n")

    result = qr("run")

    assert result.code == 0, result.stderr
    assert f"{waiting}: action=handback" in result.stderr and f"{admins}: action=handback" in result.stderr
    assert f"{held}: held by qrunner for longer than the MTA's queue lifetime" in result.stderr
    assert exim.queue_ids() == [held]  # qrunner's own hold stays, frozen, with its record
    assert held in qr("status").stdout
    moved = {m["id"]: m for m in exim.queue("")}
    assert set(moved) == {waiting, admins}
    assert not moved[waiting]["frozen"] and moved[admins]["frozen"]  # nothing thawed on the way


def test_bounces_of_gated_mail_land_in_the_named_queue_and_reach_the_policy(tmp_path, exim, exim_sink):
    """Exim submits its bounces like sendmail -t; the gate (fail closed) queues them for the policy."""
    mta = harness(exim, exim_sink)
    script = ('function CheckFile(f, a, s, c, rp)\n'
              '  if rp == "" then a.Priority = 100; print("bounce seen") end\n'
              '  return a\nend\n')
    qr = Qrunner(tmp_path, mta, script)
    exim_sink.reject_rcpt = {"nobody@example.net"}
    refused = mta.queue_message("refused", to=("nobody@example.net",), sender="carol@remote.example")

    first = qr("run")

    assert first.code == 0, first.stderr
    bounces = [m for m in exim.queue() if m["sender"] == ""]
    assert len(bounces) == 1 and bounces[0]["recipients"] == ["carol@remote.example"]
    assert refused not in exim.queue_ids()
    second = qr("run")
    assert second.code == 0, second.stderr
    assert "bounce seen" in second.stderr
    [bounce] = exim_sink.wait_for(1)
    assert bounce.mail_from in ("", "<>") and bounce.rcpt_tos == ["carol@remote.example"]


def test_gate_catches_sendmail_t_and_leaves_bare_local_names_alone(tmp_path, exim, exim_sink):
    mta = harness(exim, exim_sink)
    subprocess.run(exim.argv + ["-t", "-oi"], input=b"To: c@example.net\nSubject: via -t\n\nbody\n", check=True)
    subprocess.run(exim.argv + ["-oi", "--", "root"], input=b"Subject: for root\n\nbody\n", check=True)
    time.sleep(0.5)
    assert [m["recipients"] for m in exim.queue()] == [["c@example.net"]]
    assert exim_sink.messages == []
    assert "for root" in exim.mailbox_text()


def test_gate_catches_smtp_without_chunking(tmp_path, exim, exim_sink):
    """BDAT would skip acl_smtp_predata; the gate offers no CHUNKING, so SMTP mail is gated."""
    script = b"EHLO client\r\nQUIT\r\n"
    ehlo = subprocess.run(exim.argv + ["-bs"], input=script, capture_output=True, check=True).stdout
    assert b"CHUNKING" not in ehlo
    message_id = exim.submit_smtp("alice@qrunner-test.localdomain", ["d@example.net"], b"Subject: smtp\n\nbody\n")
    assert message_id in exim.queue_ids()


def test_null_sender_mail_in_the_named_queue_reaches_the_policy_with_empty_return_path(tmp_path, exim, exim_sink):
    mta = harness(exim, exim_sink)
    script = ('function CheckFile(f, a, s, c, rp)\n'
              '  if rp == "" then a.SkipSend = 1; a.Reason = "bounces wait" end\n'
              '  return a\nend\n')
    qr = Qrunner(tmp_path, mta, script)
    bounce = mta.queue_message("a bounce", sender="")
    normal = mta.queue_message("normal")

    result = qr("run")

    assert result.code == 0, result.stderr
    assert f'{bounce}: action=hold sender=default priority=50 reason="bounces wait"' in result.stderr
    assert mta.where(bounce) == HELD
    mta.wait_gone(normal)


def test_not_root_exits_77_before_touching_anything(tmp_path, exim, exim_sink, mocker, capsys):
    from qrunner.cli import main

    qr = Qrunner(tmp_path, harness(exim, exim_sink), ALLOW_ALL)
    mocker.patch("os.geteuid", return_value=65534)
    assert main(["--config", str(qr.config_path), "run"]) == 77
    assert "must run as root" in capsys.readouterr().err


def test_release_of_named_holds_to_the_default_queue(tmp_path, exim, exim_sink):
    mta = harness(exim, exim_sink)
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    first, second = mta.queue_message("one"), mta.queue_message("two")
    assert qr("run").code == 0

    result = qr("release", first, "--to-default-queue")

    assert result.code == 0, result.stderr
    assert exim.queue_ids() == [second] and mta.where(second) == HELD
    moved = {m["id"]: m for m in exim.queue("")}
    assert first in moved and not moved[first]["frozen"]


def test_contrib_gate_is_the_gate_these_tests_run(exim):
    """The test instance's gate (tests/exim_instance.py) and contrib/exim's must not drift apart."""
    contrib = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "contrib", "exim")
    tested = exim.config_text()
    gate_lines = lambda text: {line.strip() for line in text.splitlines()
                               if line.strip().startswith(("warn   queue =", "control = queue"))}
    for name in ("exim-gate.conf", os.path.join("conf.d", "acl", "35_qrunner_gate")):
        with open(os.path.join(contrib, name)) as f:
            shipped = f.read()
        assert gate_lines(shipped) and gate_lines(shipped) <= gate_lines(tested), name
    for name in ("exim-gate.conf", os.path.join("conf.d", "main", "05_qrunner_gate")):
        with open(os.path.join(contrib, name)) as f:
            assert re.search(r"^chunking_advertise_hosts =\s*$", f.read(), re.M), name
    assert re.search(r"^chunking_advertise_hosts =\s*$", tested, re.M)


def test_a_freeze_that_fails_for_some_messages_leaves_the_others_frozen_with_their_records(tmp_path, exim, exim_sink):
    """qrunner freezes in two exim processes at once: when one of them fails, what the other froze stays
    frozen with qrunner's record, nothing is left frozen without one, and the next run freezes the rest."""
    mta = harness(exim, exim_sink)
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    ids = [mta.queue_message(f"hold {number}") for number in range(4)]
    bad = ids[-1]
    real = exim.binary
    wrapper = tmp_path / "exim-failing-for-one"
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *" -Mf "*" {bad} "*) echo "exim: spool file locked" >&2; '
                       f'exit 1;; esac\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    config = qr.config_path.read_text()
    qr.config_path.write_text(config.replace(f'binary = "{real}"', f'binary = "{wrapper}"'))

    result = qr("run")

    assert result.code == 69 and "exim -Mf failed (exim: spool file locked)" in result.stderr, result.stderr
    frozen = {m["id"] for m in exim.queue() if m["frozen"]}
    assert bad not in frozen and frozen, frozen  # the other process's freezes were made ...
    status = qr("status").stdout
    assert all(queue_id in status for queue_id in frozen), status  # ... and each is qrunner's, with its record
    qr.config_path.write_text(config)
    assert qr("run").code == 0
    assert {m["id"] for m in exim.queue() if m["frozen"]} == set(ids)
    status = qr("status").stdout
    assert all(queue_id in status for queue_id in ids), status


ENVELOPE_AS_REASON = ('function CheckFile(f, a, size, created, returnpath, recipients)\n'
                      '  a.SkipSend = 1\n'
                      '  a.Reason = returnpath .. "|" .. table.concat(recipients, ",") .. "|" .. size\n'
                      '  return a\nend\n')


def test_the_policy_sees_each_envelope_as_exim_lists_it_and_a_message_being_delivered_is_left_alone(
        tmp_path, exim, exim_sink):
    """The listing reads the spool in one pass, yet says what ``exim -bp`` and exipick say: the return path, the
    recipients still to be delivered (after a partial delivery; with DSN data on the recipient lines; with an
    interrupted delivery's ``-J`` journal, which Exim counts as delivered) and ``$message_size``; a message an
    Exim process is delivering is left alone."""
    mta = harness(exim, exim_sink)
    qr = Qrunner(tmp_path, mta, ENVELOPE_AS_REASON)
    sender = "alice@qrunner-test.localdomain"
    plain = mta.queue_message("plain", size=3000)
    exim_sink.defer_rcpt = {"carol@example.net"}
    partial = exim.submit(sender, ["bob@example.net", "carol@example.net"], b"Subject: partial\n\nx\n")
    exim.deliver(partial)  # bob's copy delivered, carol's deferred: the -H file's non-recipients tree names bob
    exim_sink.wait_for(1)
    dsn = exim.submit_smtp(sender, ["dave@example.net", "erin@example.net"], b"Subject: dsn\n\nx\n",
                           mail_params="RET=HDRS ENVID=qr-2",
                           rcpt_params={"dave@example.net": "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;d@example.org"})
    interrupted = exim.submit(sender, ["frank@example.net", "gina@example.net"], b"Subject: interrupted\n\nx\n")
    journal = exim.header_path(interrupted)[:-1] + "J"
    with open(journal, "w") as f:
        f.write("frank@example.net\n")  # a delivery that died after its first address, as Exim's journal says
    busy = mta.queue_message("busy")
    exim_sink.data_delay = 8
    mta.deliver_outside(busy)

    result = qr("plan", "--format", "json")

    assert result.code == 0, result.stderr
    reasons = {d["queue_id"]: d["reason"] for d in json.loads(result.stdout)["decisions"]}
    listed = {m["id"]: m for m in exim.queue()}
    sizes = exim.exipick(["message_size"])
    assert listed[partial]["recipients"] == ["carol@example.net"]
    assert listed[interrupted]["recipients"] == ["gina@example.net"]
    for message_id in (plain, partial, dsn, interrupted):
        assert reasons[message_id] == (f"{listed[message_id]['sender']}|{','.join(listed[message_id]['recipients'])}"
                                       f"|{sizes[message_id]['message_size']}"), message_id
    assert busy not in reasons
    named = qr("flush", busy)  # named, a message qrunner may not touch says why
    assert named.code == 1 and f"{busy}: being delivered by Exim right now; left alone" in named.stderr, named.stderr
