"""``qrunner snapshot [-o FILE]``: the live queue's candidates as the JSON lines ``plan --queue-file`` reads (issue 11,
point 4).

Planned offline at the same ``--now``, a snapshot gives every message the same action, priority and sender as the
live ``plan``, on the memory back end, Postfix and Exim, with a policy that uses two senders, headers, the clock and a
global that counts calls (so the order of the messages matters too). Which messages the snapshot must hold comes from
the MTA's own listing (``postqueue -j``, ``exim -bp``, the memory queue's file).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import pytest

from memory_harness import MemoryHarness
from mta_harness import HELD, WAITING
from qrunner_e2e import SKIP_ALL, Qrunner
from test_senders import listener_ports, relays, sinks  # noqa: F401  (fixtures: the senders' routes)
from two_senders import submit, two_senders

POLICY = """
calls = 0
function CheckFile(f, a, size, created, from, rcpts, h, lines)
  calls = calls + 1
  local hour = os.date("*t").hour
  local subject = h.subject or ""
  if subject:find("hold") then a.SkipSend = 1; a.Reason = "held by subject"; return a end
  if senderid == 0 then
    if h["X-Urgency"] == "high" or #rcpts > 1 then a.Priority = 90 + calls % 5; return a end
    a.SkipSend = 1; a.Reason = "isp takes urgent mail and lists only"; return a
  end
  if size > 20000 and hour >= 8 and hour < 18 then a.SkipSend = 1; a.Reason = "big mail waits for the evening"; return a end
  a.Priority = 20 + calls % 7 + #lines % 3 + (created:sub(1, 4) == os.date("%Y") and 10 or 0)
  return a
end
"""

DAY, NIGHT = "2026-11-25T10:00:00", "2026-11-25T20:00:00"


@pytest.fixture(params=["memory", "postfix", "exim"])
def routed(request, tmp_path):
    return two_senders(request, tmp_path, SKIP_ALL)


def decisions(result) -> dict:
    """queue id -> (action, priority, sender) from ``plan --format json``."""
    assert result.code == 0, result.stderr
    return {d["queue_id"]: (d["action"], d["priority"], d["sender_name"])
            for d in json.loads(result.stdout)["decisions"]}


def test_a_snapshot_planned_offline_decides_as_the_live_queue(routed, tmp_path):
    mta, qr = routed
    ours = submit(mta, "please hold")
    assert qr("run").code == 0  # qrunner's own hold: a run decides it again, so the snapshot has it
    urgent = submit(mta, "report", headers=[("X-Urgency", "high")])
    listed = submit(mta, "newsletter", to=("a@example.net", "b@example.org"))
    big = submit(mta, "photos", size=30000)
    submit(mta, "plain", headers=[("X-Note", "1")])
    submit(mta, "plainer")
    theirs = submit(mta, "the admin's own")
    mta.admin_hold(theirs)  # someone else's hold: never decided, so not in the snapshot
    qr.set_script(POLICY)
    path = tmp_path / "queue.jsonl"

    result = qr("snapshot", "-o", str(path))

    assert result.code == 0, result.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    queue = mta.snapshot()  # postqueue -j, exim -bp, the memory queue's file
    assert queue[ours][0] == HELD and queue[theirs][0] == HELD
    assert {line["queue_id"] for line in lines} == {q for q, (where, _) in queue.items() if where == WAITING} | {ours}
    assert len(lines) == 6
    assert [line["arrival_time"] for line in lines] == sorted(line["arrival_time"] for line in lines)
    for line in lines:
        queue_id = line["queue_id"]
        assert line["message_size"] == mta.size(queue_id) and int(line["arrival_time"]) == mta.arrival(queue_id)
        assert [r["address"] for r in line["recipients"]] == list(queue[queue_id][1])
        assert os.path.exists(line["filename"])
    [urgent_line] = [line for line in lines if line["queue_id"] == urgent]
    assert "Subject: report" in urgent_line["headers"] and "X-Urgency: high" in urgent_line["headers"]

    by_time = {}
    for now in (DAY, NIGHT):
        live = decisions(qr("plan", "--now", now, "--format", "json"))
        offline = decisions(qr("plan", "--queue-file", str(path), "--now", now, "--format", "json"))
        assert offline == live
        by_time[now] = live
    day, night = by_time[DAY], by_time[NIGHT]
    assert day[big] == ("skip", 50, None) and night[big][0] == "send"  # the clock matters
    assert day[urgent][2] == day[listed][2] == "isp" and day[ours] == ("skip", 50, None)
    assert {sender for _, _, sender in night.values()} == {"isp", "backup", None}


@pytest.fixture
def memory(tmp_path):
    mta = MemoryHarness(str(tmp_path / "queue"))
    return mta, Qrunner(tmp_path, mta, POLICY)


def test_to_stdout_and_to_a_file_alike_and_the_file_is_never_world_readable(memory, tmp_path):
    mta, qr = memory
    mta.queue_message("one")
    mta.queue.submit("", ["carol@example.org"], b"Subject: caf\xe9 \xff\nX-Folded: a\n b\n\nbody\n")  # a bounce
    path = tmp_path / "out" / "queue.jsonl"
    path.parent.mkdir()
    path.write_text("an older snapshot\n")
    os.chmod(path, 0o644)

    to_stdout = qr("snapshot")
    umask = os.umask(0)
    try:
        to_file = qr("snapshot", "-o", str(path))
    finally:
        os.umask(umask)

    assert to_stdout.code == 0 and to_file.code == 0, to_stdout.stderr + to_file.stderr
    assert path.read_text() == to_stdout.stdout and len(to_stdout.stdout.splitlines()) == 2
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # replaced, not rewritten in place, and 0600 under umask 0
    assert os.listdir(path.parent) == ["queue.jsonl"]  # no temporary file left beside it
    assert "snapshot: 2 messages written to" in to_file.stderr
    bounce = json.loads(to_stdout.stdout.splitlines()[1])
    assert bounce["sender"] == "" and bounce["headers"] == ["Subject: caf\udce9 \udcff", "X-Folded: a\n b"]
    qr.set_script('function CheckFile(f, a, s, c, rp, r, h, lines)\n'
                  '  a.Priority = (string.byte(h.subject, 4) or 0) % 50 + #lines[2] + #rp\n  return a\nend\n')
    offline = decisions(qr("plan", "--queue-file", str(path), "--format", "json"))
    assert offline == decisions(qr("plan", "--format", "json"))  # byte for byte
    assert sorted(priority for _, priority, _ in offline.values()) == [47, 49]


def test_a_snapshot_that_cannot_be_written_is_one_sentence_and_exit_73(memory, tmp_path):
    mta, qr = memory
    mta.queue_message("one")

    missing = qr("snapshot", "-o", str(tmp_path / "no-such-dir" / "queue.jsonl"))
    device = qr("snapshot", "-o", "/dev/null")

    assert missing.code == 73 and missing.stdout == ""
    assert missing.stderr == (f"qrunner: {tmp_path / 'no-such-dir' / 'queue.jsonl'}: cannot create the snapshot file "
                              "(No such file or directory); name a file in a directory qrunner may write.\n")
    assert device.code == 73 and device.stderr == (
        "qrunner: /dev/null: is not a regular file; name a file with -o, or leave -o out to write the snapshot to "
        "standard output.\n")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_the_manuals_commands_are_every_command_and_only_those():
    """qrunner(8) (the reference the README points to) has a COMMANDS entry for each command --help lists."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shown = subprocess.run([sys.executable, "-m", "qrunner", "--help"], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=root), check=True).stdout
    commands = {word for word in re.findall(r"^    (\w+)", shown, re.M)}
    with open(os.path.join(root, "man", "qrunner.8")) as f:
        page = f.read().split('.SH "COMMANDS"', 1)[1].split("\n.SH ", 1)[0]
    documented = set(re.findall(r'^\.SS "qrunner (\w+)"$', page, re.M))
    assert commands == documented == {"plan", "check", "run", "flush", "release", "status", "explain", "snapshot"}
