"""Load (issue 14, point 4): a run over a big queue with a policy that fails on one message in ten, and timers,
an admin's flush and release racing each other for an hour of runs in compressed time.

Everything is judged from the MTA's side: the memory model's queue (``MemoryQueue.read()``, its ``delivered``
list in the order the relay got the mail), Postfix's ``postqueue -j`` and the SMTP sink's arrivals; qrunner's own
``status`` is read only to show that every message qrunner held has its record and reason.

Sizes: the suite runs the big queue at 100,000 messages over the memory back end (about 20 s here) and at
2,000 over a real Postfix; ``make reliability`` (QRUNNER_LONG=1) runs the Postfix one at 100,000 too.
"""

from __future__ import annotations

import glob
import json
import os
import random
import smtplib
import subprocess
import sys
import time
from collections import Counter
from typing import Dict, List, Sequence

import pytest

from batches import in_batches
from memory_harness import MemoryHarness
from mta_harness import HELD, WAITING, PostfixHarness, harness_for
from postfix_instance import free_loopback_port
from qrunner_e2e import Qrunner
from smtp_sink import wait_for_greeting

from qrunner.mta.memory import MemoryQueue
from qrunner.mta.postfix_flush import FLUSH_WINDOW

LONG = os.environ.get("QRUNNER_LONG") == "1"
BIG_QUEUE = 100_000  # the issue asks for 100,000 over the memory back end in the suite

# Peak RSS allowed for the qrunner process and its Lua worker (the larger of the two), in MB: a fixed part for
# Python, lupa and SQLite, and a part per queued message. Over the memory back end the model's own copy of the
# queue lives in qrunner's process (a real MTA keeps its queue outside), so its bound is the looser one.
RSS_FIXED_MB = 80
RSS_PER_MESSAGE_KB = {"memory": 3.2, "postfix": 2.5}

# Every tenth message (its recipient at poison.example) makes the script raise a runtime error; every seventh
# of the others waits; the rest are sent with a priority read from the recipient.
TENTH_FAILS = """
function CheckFile(Filename, Actions, Size, CreationTime, ReturnPath, Recipients)
  local r = Recipients[1]
  if r:find("@poison%.example$") then error("no rule for " .. r) end
  local n = tonumber(r:match("^m(%d+)@"))
  if n % 7 == 0 then Actions.SkipSend = true; Actions.Reason = "every seventh waits" return Actions end
  Actions.Priority = 1 + n % 100
  return Actions
end
"""

# ``python PEAK_RSS OUT COMMAND...``: runs COMMAND and writes the peak RSS (KB) of it and every descendant it
# waited for (qrunner's Lua worker) to OUT, as the kernel counts it (getrusage of the children).
PEAK_RSS = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


@pytest.fixture
def memory(tmp_path):
    return MemoryHarness(str(tmp_path / "queue"))


def recipient(number: int) -> str:
    return f"m{number}@poison.example" if number % 10 == 0 else f"m{number}@example.net"


def expected(number: int):
    """What the contract says for message ``number``: ("hold", reason start) or ("send", priority)."""
    if number % 10 == 0:
        return "hold", "policy error: "
    if number % 7 == 0:
        return "hold", "every seventh waits"
    return "send", 1 + number % 100


def content(number: int) -> bytes:
    return (f"From: alice@qrunner-test.localdomain\nTo: {recipient(number)}\nSubject: load {number}\n"
            f"Message-ID: <load-{number}@qrunner-test.localdomain>\n\nmessage {number} of the load run\n").encode()


def with_peak_rss(qr: Qrunner, tmp_path) -> str:
    """Start ``qr``'s commands under the PEAK_RSS wrapper; the file it writes the figure to."""
    script = tmp_path / "peak_rss.py"
    script.write_text(PEAK_RSS)
    out = tmp_path / "peak_rss"
    qr.wrapper = [sys.executable, str(script), str(out)]
    return str(out)


def generous_time_limit(qr: Qrunner) -> Qrunner:
    """script_timeout 60 s, not the harness's 2: these runs are about errors and load, not the time limit, and on a
    loaded 2-core machine one trivial call was seen to stall past 2 s (its message then held, fail closed)."""
    qr.config_path.write_text(qr.config_path.read_text().replace("script_timeout = 2\n", "script_timeout = 60\n"))
    return qr


def holds_by_id(qr: Qrunner) -> Dict[str, str]:
    status = qr("status", "--format", "json", timeout=600)
    assert status.code in (0, 1), status.stderr
    return {h["queue_id"]: h["reason"] for h in json.loads(status.stdout)["holds"]}


@pytest.mark.reliability
def test_a_run_over_a_big_queue_with_a_policy_error_on_every_tenth(tmp_path, memory, figures):
    """The other 90% are decided as the script says (sent in dispatch order, or held with its reason), the 10%
    are held fail-closed with the policy error as their reason, and memory stays within its bound."""
    base = time.time() - BIG_QUEUE - 60
    ids = memory.queue.submit_many(("alice@qrunner-test.localdomain", [recipient(n)], content(n), base + n)
                                   for n in range(1, BIG_QUEUE + 1))
    number = {queue_id: n for n, queue_id in enumerate(ids, start=1)}
    qr = generous_time_limit(Qrunner(tmp_path, memory, TENTH_FAILS))
    peak_file = with_peak_rss(qr, tmp_path)

    result = qr("run", "-q", timeout=3600)

    assert result.code == 1, result.stderr[-3000:]  # 1: decided, with policy errors (README "Exit codes")
    assert "Traceback" not in result.stderr
    peak_mb = int(open(peak_file).read()) / 1024
    queue = memory.sink._queue()
    delivered = [d["id"] for d in queue["delivered"]]
    where = {m["id"]: m["state"] for m in queue["messages"]}
    sends = sorted((n for n in range(1, BIG_QUEUE + 1) if expected(n)[0] == "send"),
                   key=lambda n: (-expected(n)[1], base + n))
    wanted = [ids[n - 1] for n in sends]
    missing = sorted(set(wanted) - set(delivered))[:5]
    assert delivered == wanted, ("every allowed message once, highest priority first; not delivered: "
                                 f"{[(q, where.get(q)) for q in missing]}",
                                 [line for line in result.stderr.splitlines() if any(q in line for q in missing)])
    held = {queue_id for queue_id, state in where.items() if state == HELD}
    assert held == {ids[n - 1] for n in range(1, BIG_QUEUE + 1) if expected(n)[0] == "hold"}
    assert set(where) == held  # nothing left waiting, nothing lost
    reasons = holds_by_id(qr)
    assert set(reasons) == held
    wrong = [q for q in held if not reasons[q].startswith(expected(number[q])[1])]
    assert not wrong, [(q, reasons[q]) for q in wrong[:5]]
    assert sum(1 for q in held if number[q] % 10 == 0) == BIG_QUEUE // 10
    bound_mb = RSS_FIXED_MB + BIG_QUEUE * RSS_PER_MESSAGE_KB["memory"] / 1024
    assert peak_mb < bound_mb, f"peak RSS {peak_mb:.0f} MB over the bound of {bound_mb:.0f} MB"
    lost = BIG_QUEUE - len(delivered) - len(held)
    figures.record("load", f"one run over {BIG_QUEUE:,} messages (memory back end), a policy error on every "
                   "tenth", tried=BIG_QUEUE, survived=len(delivered) + len(held), lost=lost,
                   duplicates=len(delivered) - len(set(delivered)),
                   note=f"{len(delivered):,} sent in dispatch order, {len(held):,} held with their reason "
                        f"({BIG_QUEUE // 10:,} fail-closed on the policy error); peak RSS {peak_mb:.0f} MB "
                        f"(bound {bound_mb:.0f} MB)")


# -- timers, an admin's flush and release, racing ------------------------------------------------------------

# Urgent mail always goes (priority 90), evening mail waits until 19:00 on the script's clock, and some mail the
# policy never sends: the verdicts change with the hour as the compressed clock passes 19:00.
BY_THE_HOUR = """
function CheckFile(Filename, Actions, Size, CreationTime, ReturnPath, Recipients)
  local domain = Recipients[1]:match("@(.*)$")
  if sendername == "isp" then
    if domain ~= "example.net" then Actions.SkipSend = true; Actions.Reason = "not for isp" end
    Actions.Priority = 90
    return Actions
  end
  if domain == "never.example" then Actions.SkipSend = true; Actions.Reason = "never by policy" return Actions end
  if domain == "evening.example" and os.date("*t").hour < 19 then
    Actions.SkipSend = true; Actions.Reason = "waits for the evening" return Actions
  end
  if domain == "example.net" then Actions.Priority = 90 end
  return Actions
end
"""
KINDS = ("example.net", "evening.example", "never.example")
# Over the memory back end urgent mail leaves by the sender "isp"'s route (held, copied onto the route, the
# original removed: a hand-over), the rest by "backup", the MTA's own route: two runs acting at once would
# hand a message over twice, and the relay would get it twice.
MEMORY_SENDERS = '[[sender]]\nid = 0\nname = "isp"\n[[sender]]\nid = 1\nname = "backup"\ndefault = true\n'

LOCKED = 75


@pytest.fixture(params=["memory", "postfix", "exim"])
def mta(request, tmp_path):
    return harness_for(request, tmp_path)


def subjects_delivered(mta) -> Counter:
    return Counter(m.header("Subject").decode() for m in mta.sink.messages)


def at(minutes: int) -> str:
    """The script's clock, ``minutes`` after 18:30 of a fixed day (local time)."""
    clock = time.mktime((2026, 12, 1, 18, 30, 0, 0, 0, -1)) + 60 * minutes
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(clock))


def race(qr: Qrunner, commands: List[List[str]], rng: random.Random) -> List[int]:
    """Start the commands together (in a shuffled order, up to half a second apart: some overlap, some find the
    others finished), as timers and an admin would; their exit codes, each of them one a user may see (0, 1, or
    75 for the lock), never a traceback."""
    order = list(commands)
    rng.shuffle(order)
    started = []
    for args in order:
        started.append((args, qr.start(*args)))
        time.sleep(rng.uniform(0, 0.5))
    codes = []
    for args, proc in started:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode in (0, 1, LOCKED), (args, proc.returncode, err)
        assert "Traceback" not in err, (args, err)
        if proc.returncode == LOCKED:
            assert "holds the lock" in err, err
        codes.append(proc.returncode)
    return codes


@pytest.mark.reliability
def test_timers_flush_and_release_racing_for_an_hour_lose_nothing_and_send_nothing_twice(tmp_path, mta, figures):
    """Every five minutes of the script's clock (an hour from 18:30; three under QRUNNER_LONG=1 over the memory
    back end; twenty minutes around 19:00 over Postfix and Exim) new mail arrives, then two timers' runs, an admin's
    flush (now and then --ignore-policy) and an admin's release start together; the lock lets one act and the
    others exit 75. At the end every message reached the relay at most once, and every one is either delivered
    or in the queue, held by qrunner with its record; urgent and evening mail all went, and the never-sent mail
    only where the admin flushed it past the policy."""
    rng = random.Random(int(os.environ.get("QRUNNER_LOAD_SEED", "14")))
    real = mta.name != "memory"
    minutes = range(20, 45, 5) if real else range(0, (180 if LONG else 60) + 1, 5)
    if not real:
        mta.set(delivery_seconds=0.2)  # deliveries still under way when the next commands start
    qr = Qrunner(tmp_path, mta, BY_THE_HOUR)
    if not real:
        qr.config_path.write_text(qr.config_path.read_text() + MEMORY_SENDERS)
    kind_of: Dict[str, str] = {}     # subject -> the kind of mail (the recipient's domain)
    subject_of: Dict[str, str] = {}  # queue id -> subject, as submitted (a copy on a route is delivered at once)
    forced: set = set()
    codes: List[int] = []
    for minute in minutes:
        for kind in KINDS:
            subject = f"race {len(kind_of) + 1}"
            kind_of[subject] = kind
            subject_of[mta.queue_message(subject, to=[f"r{len(kind_of)}@{kind}"])] = subject
        # what the admin sees and picks from: the mail as submitted (not a copy on its way out by a route)
        queue = {q: entry for q, entry in mta.snapshot().items() if q in subject_of}
        held = sorted(q for q, (where, _) in queue.items() if where == HELD)
        waiting = sorted(q for q, (where, _) in queue.items() if where == WAITING)
        commands = [["run", "--now", at(minute)], ["run", "--now", at(minute + 1)]]
        if queue:
            target = rng.choice(sorted(queue))
            if rng.random() < 0.3:
                commands.append(["flush", "--ignore-policy", target])
                forced.add(subject_of[target])
            else:
                commands.append(["flush", "--now", at(minute + 2), target])
        if held or waiting:
            commands.append(["release", rng.choice(held or waiting)])
        codes += race(qr, commands, rng)

    final = qr("run", "--now", at(90 + minutes[-1]))  # the next evening tick, nothing racing it
    assert final.code in (0, 1), final.stderr
    time.sleep(0.3)
    if real:
        mta.sink.wait_for(sum(1 for k in kind_of.values() if k != "never.example"), timeout=120)
        deadline = time.monotonic() + 120
        while any(where != HELD for where, _ in mta.snapshot().values()):
            assert time.monotonic() < deadline, mta.snapshot()
            time.sleep(0.2)
        time.sleep(1)  # a second copy of anything would be on its way by now
    arrived = subjects_delivered(mta)
    queue = mta.snapshot()
    records = holds_by_id(qr)
    in_queue = Counter(subject_of.get(queue_id, queue_id) for queue_id in queue)
    duplicates = sum(count - 1 for count in arrived.values() if count > 1)
    assert duplicates == 0, [s for s, c in arrived.items() if c > 1]
    missing = sorted(set(kind_of) - set(arrived) - set(in_queue))
    assert not missing, f"lost: {missing}"
    assert set(arrived) | set(in_queue) <= set(kind_of)  # nothing else arrived (a bounce, say)
    assert not set(arrived) & set(in_queue)
    for queue_id, (where, _) in queue.items():
        assert where == HELD and queue_id in records, (queue_id, where, subject_of.get(queue_id))
        assert kind_of[subject_of[queue_id]] == "never.example", (queue_id, records[queue_id])
        assert records[queue_id].endswith("never by policy"), records[queue_id]
    assert all(subject in arrived for subject, kind in kind_of.items() if kind != "never.example")
    never_sent = {s for s in arrived if kind_of[s] == "never.example"}
    assert never_sent <= forced  # only the admin's flush past the policy sent what the policy never sends
    assert codes.count(LOCKED) > 0  # the lock did decide: some of the racing commands found it taken
    if not real:  # urgent mail was handed over to isp's route, the rest left by the MTA's own
        assert {d["route"] for d in mta.sink._queue()["delivered"]} == {"isp", "default"}
    lost = len(kind_of) - len(arrived) - len(in_queue)
    figures.record("load", f"two timers, flush and release racing for {minutes[-1] - minutes[0]} minutes of "
                   f"runs ({mta.name})", tried=len(kind_of), survived=len(arrived) + len(in_queue), lost=lost,
                   duplicates=duplicates,
                   note=f"{len(codes)} racing commands, {codes.count(LOCKED)} of them exited 75 on the lock; "
                        f"{len(arrived)} delivered once, {len(in_queue)} held with their record")


# -- the big queue in a real Postfix ------------------------------------------------------------------------

POSTFIX_QUEUE = 100_000 if LONG else 2_000
SESSION = 500  # messages per SMTP session while building the queue


def inject_over_smtp(port: int, numbers: List[int], threads: int = 2) -> None:
    """Queue the messages through a loopback smtpd, SESSION to a session, as bench/postfix_bench.py builds its
    queues (far faster than a sendmail process per message)."""

    def session(batch: Sequence[int]) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
            for n in batch:
                try:
                    client.sendmail("alice@qrunner-test.localdomain", [recipient(n)],
                                    content(n).replace(b"\n", b"\r\n"))
                except (OSError, smtplib.SMTPException) as error:
                    raise RuntimeError(f"message {n}: {error}") from None

    errors = in_batches(numbers, SESSION, threads, session)
    assert not errors, errors[:3]


def wait_until(what: str, condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(1)


@pytest.mark.reliability
def test_a_run_over_a_postfix_queue_with_a_policy_error_on_every_tenth(tmp_path, postfix, smtp_sink, figures):
    """The same policy over a real Postfix queue (2,000 messages; 100,000 under QRUNNER_LONG=1): the sink gets
    each allowed message once, Postfix's flush service is asked for them in dispatch order, the rest is in
    Postfix's hold queue with qrunner's record and reason, and memory stays within its bound."""
    # Building 100,000 takes longer than Postfix's usual backoff: a gated message due again meanwhile would move
    # deferred -> active -> deferred while the queue is listed (seen twice or not at all in one postqueue -j)
    # and while qrunner runs. As bench/postfix_bench.py does, the retry time stays put for hours.
    postfix.set(minimal_backoff_time="4h", maximal_backoff_time="4h")
    port = free_loopback_port()
    postfix.add_smtpd_listener(port)
    wait_for_greeting(port)
    numbers = list(range(1, POSTFIX_QUEUE + 1))
    try:
        inject_over_smtp(port, numbers)
        run_over_the_postfix_queue(tmp_path, postfix, smtp_sink, figures, numbers)
    finally:  # the fixture's own clean-up gives postsuper a minute, too little for 100,000 messages
        subprocess.run(["postsuper", "-c", postfix.config_directory, "-d", "ALL"], capture_output=True,
                       timeout=3600)


def run_over_the_postfix_queue(tmp_path, postfix, smtp_sink, figures, numbers: List[int]) -> None:

    def gated() -> bool:
        entries = postfix.queue()
        return len(entries) == POSTFIX_QUEUE and all(
            e["queue_name"] == "deferred" and all("deferred transport" in r.get("delay_reason", "")
                                                  for r in e["recipients"]) for e in entries)
    wait_until("the Postfix queue did not settle, every message deferred by the gate", gated, 300 + POSTFIX_QUEUE / 20)
    listed = postfix.queue()
    id_of = {int(e["recipients"][0]["address"].split("@")[0][1:]): e["queue_id"] for e in listed}
    arrival = {e["queue_id"]: e["arrival_time"] for e in listed}
    assert sorted(id_of) == numbers
    qr = generous_time_limit(Qrunner(tmp_path, PostfixHarness(postfix, smtp_sink), TENTH_FAILS))
    peak_file = with_peak_rss(qr, tmp_path)

    result = qr("run", "-q", timeout=7200)

    assert result.code == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    peak_mb = int(open(peak_file).read()) / 1024
    sends = [n for n in numbers if expected(n)[0] == "send"]
    holds = [n for n in numbers if expected(n)[0] == "hold"]
    smtp_sink.wait_for(len(sends), timeout=600 + POSTFIX_QUEUE / 10)
    wait_until("Postfix still delivers", lambda: all(e["queue_name"] == "hold" for e in postfix.queue()), 600)
    time.sleep(1)  # a second copy of anything would be on its way by now
    arrived = Counter(int(r.split("@")[0][1:]) for m in smtp_sink.messages for r in m.rcpt_tos)
    assert sorted(arrived) == sends and set(arrived.values()) == {1}
    held = {e["queue_id"] for e in postfix.queue() if e["queue_name"] == "hold"}
    assert held == {id_of[n] for n in holds}
    reasons = holds_by_id(qr)
    assert set(reasons) == held
    number = {queue_id: n for n, queue_id in id_of.items()}
    wrong = [q for q in held if not reasons[q].startswith(expected(number[q])[1])]
    assert not wrong, [(q, reasons[q]) for q in wrong[:5]]
    # Postfix's flush service was asked in dispatch order (its -v log; the sink cannot tell, DESIGN.md 4): the
    # levels exactly, and within a level each request no further from its place than the few qrunner has on
    # their way at once, which the service may take in either order (qrunner/mta/postfix_flush.py)
    order = [id_of[n] for n in sorted(sends, key=lambda n: (-expected(n)[1], arrival[id_of[n]], id_of[n]))]
    ours = set(id_of.values())
    requested = [q for q in postfix.flush_requests() if q in ours]
    assert sorted(requested) == sorted(order)
    priority = {id_of[n]: expected(n)[1] for n in sends}
    assert [priority[q] for q in requested] == [priority[q] for q in order]
    place = {q: i for i, q in enumerate(order)}
    astray = [(q, i, place[q]) for i, q in enumerate(requested) if abs(i - place[q]) >= FLUSH_WINDOW]
    assert not astray, astray[:5]
    bound_mb = RSS_FIXED_MB + POSTFIX_QUEUE * RSS_PER_MESSAGE_KB["postfix"] / 1024
    assert peak_mb < bound_mb, f"peak RSS {peak_mb:.0f} MB over the bound of {bound_mb:.0f} MB"
    figures.record("load", f"one run over {POSTFIX_QUEUE:,} messages (Postfix), a policy error on every tenth",
                   tried=POSTFIX_QUEUE, survived=len(arrived) + len(held),
                   lost=POSTFIX_QUEUE - len(arrived) - len(held), duplicates=sum(arrived.values()) - len(arrived),
                   note=f"{len(arrived):,} delivered once, {len(held):,} held with their reason "
                        f"({POSTFIX_QUEUE // 10:,} fail-closed on the policy error); peak RSS "
                        f"{peak_mb:.0f} MB (bound {bound_mb:.0f} MB)")


# -- the memory model's own log, at any size ----------------------------------------------------------------

def test_an_operation_a_kill_left_half_written_does_not_count(tmp_path):
    """A SIGKILL inside the write of an operation's log line leaves a line without its newline: every reader
    ignores it (the operation did not happen), and the next operation cuts it off before writing its own."""
    directory = str(tmp_path / "queue")
    os.makedirs(directory)
    tool = MemoryQueue(directory)
    first = tool.submit("a@example.org", ["b@example.net"], content(1))
    [log] = glob.glob(os.path.join(directory, "queue.log.*"))
    with open(log, "ab") as f:
        f.write(b'{"messages":{"M00000099":{"id":"M00000099","state":"wai')  # killed mid-write

    assert [m["id"] for m in MemoryQueue(directory).read()["messages"]] == [first]
    second = MemoryQueue(directory).submit("a@example.org", ["b@example.net"], content(2))
    assert [m["id"] for m in MemoryQueue(directory).read()["messages"]] == [first, second]
    with open(log, "rb") as f:
        assert all(json.loads(line) for line in f.read().splitlines())


def test_the_queue_is_one_queue_across_processes_and_rewrites(tmp_path):
    """Two holders of the queue (two processes: each keeps the copy it last read) change it in turn while the
    log is folded into a new queue.json after every operation: each sees the other's changes, and a reader
    that starts afresh sees the same queue."""
    directory = str(tmp_path / "queue")
    os.makedirs(directory)
    one, other = MemoryQueue(directory), MemoryQueue(directory)
    one.COMPACT_BYTES = other.COMPACT_BYTES = 0  # a new queue.json after every operation
    ids = [(one if n % 2 else other).submit("a@example.org", [f"m{n}@example.net"], content(n)) for n in range(12)]
    for queue_id in ids[::3]:
        (other if ids.index(queue_id) % 2 else one).admin_hold(queue_id)
    one.start_delivery(ids[1], 0)
    other.start_delivery(ids[2], 0)

    fresh = MemoryQueue(directory).read()
    assert fresh == one.read() == other.read()
    assert [m["id"] for m in fresh["messages"]] == [q for q in ids if q not in (ids[1], ids[2])]
    assert {m["id"] for m in fresh["messages"] if m["state"] == HELD} == set(ids[::3])
    assert [d["id"] for d in fresh["delivered"]] == [ids[1], ids[2]]
    assert len(glob.glob(os.path.join(directory, "queue.log.*"))) <= 1
