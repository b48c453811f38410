"""Pacing and strict priority (issue 11, point 7), through the real command.

``max_per_run`` (the run's and a sender's), ``max_active``, ``max_run_seconds``
and ``strict_priority``: what a limit stops waits where it is (in the gate,
or on qrunner's hold) with its reason, logged as ``action=wait``, and the
next run sends it. The counts come from the MTA's own tools (``postqueue
-j``, ``exim -bp``, the memory queue's file), the order from the sink's
record of what arrived. Nothing here times qrunner: a slow relay, a slow
policy or a slow delivery is what makes a limit act, and the assertions
are about where the mail is and in what order it arrived.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from memory_harness import MemoryHarness
from mta_harness import ACTIVE, HELD, WAITING, harness_for
from policy_helpers import no_default_config, record, run_cli, write_config, write_snapshot  # noqa: F401
from qrunner_e2e import ALLOW_ALL, NIGHT_ONLY, Qrunner

BY_SUBJECT = """
function CheckFile(f, a, size, created, from, rcpts, headers)
  local subject = headers.subject or ""
  a.Priority = tonumber(subject:match("p(%d+)")) or 50
  return a
end
"""

# The first call takes longer than max_run_seconds: deciding alone uses up the run's time.
SLOW_FIRST_CALL = """
local first = true
function CheckFile(f, a, size, created, from, rcpts, headers)
  if first then first = false; local t = os.clock() while os.clock() - t < 1.5 do end end
  a.Priority = tonumber((headers.subject or ""):match("p(%d+)")) or 50
  return a
end
"""

ISP_OR_BACKUP = """
function CheckFile(f, a, size, created, from, rcpts, headers)
  local subject = headers.subject or ""
  a.Priority = tonumber(subject:match("p(%d+)")) or 50
  if sendername == "isp" and not subject:find("isp") then a.SkipSend = 1; a.Reason = "not for isp" end
  return a
end
"""


@pytest.fixture(params=["memory", "postfix", "exim"])
def mta(request, tmp_path):
    return harness_for(request, tmp_path)


@pytest.fixture(params=["memory", "postfix"])
def async_mta(request, tmp_path):
    """An MTA whose deliveries go on after qrunner handed them over (Exim's -Mc returns when they have ended)."""
    return harness_for(request, tmp_path)


@pytest.fixture
def memory(tmp_path):
    return MemoryHarness(str(tmp_path / "queue"))


def pacing(qr: Qrunner, text: str) -> Qrunner:
    """Top-level settings, put before the configuration's tables."""
    qr.config_path.write_text(text + "\n" + qr.config_path.read_text())
    return qr


def slow_relay(mta, seconds: float) -> None:
    """Each delivery takes ``seconds``: the sink answers DATA that late (memory: deliveries last that long)."""
    mta.sink.data_delay = seconds
    if isinstance(mta, MemoryHarness):
        mta.set(delivery_seconds=seconds)


def where(mta, ids):
    snapshot = mta.snapshot()
    return {queue_id: snapshot.get(queue_id, (None,))[0] for queue_id in ids}


def subjects(messages):
    return [m.header("Subject").decode() for m in messages]


def wait_lines(stderr: str):
    """queue id -> reason of each action=wait line of a paced message (no next_retry)."""
    return dict(re.findall(r'(\S+): action=wait sender=\S+ priority=\d+ reason="([^"]*)"', stderr))


# -- max_per_run -----------------------------------------------------------------------


def test_max_per_run_sends_the_highest_priorities_and_leaves_the_rest_for_the_next_run(tmp_path, mta):
    qr = pacing(Qrunner(tmp_path, mta, BY_SUBJECT), "max_per_run = 2")
    ids = {p: mta.queue_message(f"p{p}") for p in (10, 20, 30, 40, 50)}  # the lowest arrives first

    first = qr("run")

    assert first.code == 0, first.stderr
    assert sorted(subjects(mta.sink.wait_for(2))) == ["p40", "p50"]
    for p in (40, 50):
        mta.wait_gone(ids[p])
    assert where(mta, [ids[p] for p in (10, 20, 30)]) == {ids[p]: WAITING for p in (10, 20, 30)}
    assert len(mta.snapshot()) == 3
    reason = "max_per_run (2) reached: left for the next run"
    assert wait_lines(first.stderr) == {ids[p]: reason for p in (10, 20, 30)}
    assert f'{ids[30]}: action=wait sender=default priority=30 reason="{reason}"' in first.stderr

    second = qr("run")
    assert second.code == 0, second.stderr
    assert sorted(subjects(mta.sink.wait_for(4))[2:]) == ["p20", "p30"]
    mta.wait_gone(ids[20])
    assert list(mta.snapshot()) == [ids[10]]
    assert qr("run").code == 0
    assert subjects(mta.sink.wait_for(5))[4:] == ["p10"]


def test_a_paced_hold_stays_held_with_its_reason_until_a_run_sends_it(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, NIGHT_ONLY)
    ids = [mta.queue_message(f"report {i}") for i in range(3)]
    assert qr("run", "--now", "2026-11-25T10:00:00").code == 0
    assert set(where(mta, ids).values()) == {HELD}
    pacing(qr, "max_per_run = 1")

    night = qr("run", "--now", "2026-11-25T22:00:00")

    assert night.code == 0, night.stderr
    assert f"{ids[0]}: action=release" in night.stderr
    assert "action=release" not in night.stderr.replace(f"{ids[0]}: action=release", "")
    assert len(mta.sink.wait_for(1)) == 1
    mta.wait_gone(ids[0])
    assert where(mta, ids[1:]) == {ids[1]: HELD, ids[2]: HELD}  # never released into the queue meanwhile
    status = qr("status").stdout
    for queue_id in ids[1:]:
        [row] = [line for line in status.splitlines() if line.startswith(queue_id)]
        assert row.endswith("allowed by sender default; max_per_run (1) reached: left for the next run"), row

    assert qr("run", "--now", "2026-11-25T22:05:00").code == 0
    assert len(mta.sink.wait_for(2)) == 2
    mta.wait_gone(ids[1])
    assert where(mta, ids[2:]) == {ids[2]: HELD}


def test_a_senders_max_per_run_leaves_room_for_the_others(tmp_path, memory):
    qr = pacing(Qrunner(tmp_path, memory, ISP_OR_BACKUP), "max_per_run = 3")
    qr.config_path.write_text(qr.config_path.read_text() + '[[sender]]\nid = 0\nname = "isp"\nmax_per_run = 1\n'
                              '[[sender]]\nid = 1\nname = "backup"\ndefault = true\n')
    isp = [memory.queue_message(f"p90 isp {i}") for i in range(2)]
    backup = [memory.queue_message(f"p50 plain {i}") for i in range(3)]

    result = qr("run")

    assert result.code == 0, result.stderr
    delivered = memory.sink.wait_for(3)
    assert [(m.route, m.header("Subject").decode()) for m in delivered] == [
        ("isp", "p90 isp 0"), ("default", "p50 plain 0"), ("default", "p50 plain 1")]
    assert where(memory, [isp[1], backup[2]]) == {isp[1]: WAITING, backup[2]: WAITING}
    assert wait_lines(result.stderr) == {isp[1]: "sender isp's max_per_run (1) reached: left for the next run",
                                         backup[2]: "max_per_run (3) reached: left for the next run"}


def test_the_plan_shows_what_max_per_run_leaves_for_the_next_run(tmp_path, memory):
    qr = pacing(Qrunner(tmp_path, memory, BY_SUBJECT), "max_per_run = 1")
    low = memory.queue_message("p10")
    high = memory.queue_message("p90")

    table = qr("plan")
    planned = {d["queue_id"]: d for d in json.loads(qr("plan", "--format", "json").stdout)["decisions"]}
    dry = qr("run", "--dry-run")

    assert table.code == 0, table.stderr
    [row] = [line for line in table.stdout.splitlines() if line.startswith(low)]
    assert row.split()[1] == "wait" and row.endswith("waits for the next run: max_per_run (1) reached: left for the "
                                                     "next run")
    assert planned[low]["paced"] == "max_per_run (1) reached: left for the next run"
    assert planned[low]["next_retry"] is None and planned[high]["paced"] is None
    assert low in dry.stdout and "max_per_run (1)" in dry.stdout
    assert where(memory, [low, high]) == {low: WAITING, high: WAITING}  # a look changes nothing


def test_flush_is_not_paced(tmp_path, memory):
    """The admin's flush sends what was named now; the settings pace the timer's runs."""
    qr = pacing(Qrunner(tmp_path, memory, ALLOW_ALL), "max_per_run = 1\nmax_active = 1\nstrict_priority = true")
    ids = [memory.queue_message(f"m{i}") for i in range(3)]

    result = qr("flush", "--all")

    assert result.code == 0, result.stderr
    assert len(memory.sink.wait_for(3)) == 3
    assert "action=wait" not in result.stderr and not set(ids) & set(memory.snapshot())


# -- max_active --------------------------------------------------------------------------


def test_a_run_hands_over_nothing_while_the_mta_delivers_max_active_messages(tmp_path, mta):
    qr = pacing(Qrunner(tmp_path, mta, ALLOW_ALL), "max_active = 2")
    busy = [mta.queue_message(f"already going {i}") for i in range(2)]
    waiting = [mta.queue_message(f"waits {i}") for i in range(3)]
    slow_relay(mta, 6.0)
    for queue_id in busy:
        mta.deliver_outside(queue_id)  # being delivered, qrunner or not

    first = qr("run")

    assert first.code == 0, first.stderr
    assert "action=send" not in first.stderr
    reason = "max_active (2) reached: the MTA is delivering 2 messages; left for the next run"
    assert wait_lines(first.stderr) == {queue_id: reason for queue_id in waiting}
    assert where(mta, waiting) == {queue_id: WAITING for queue_id in waiting}

    slow_relay(mta, 0)
    assert len(mta.sink.wait_for(2, timeout=30)) == 2
    for queue_id in busy:
        mta.wait_gone(queue_id)
    for _ in range(3):  # the next runs send them, as room in the MTA's delivery allows
        later = qr("run")
        assert later.code == 0, later.stderr
        for queue_id in waiting:
            if f"{queue_id}: action=send" in later.stderr:
                mta.wait_gone(queue_id)
        if not set(waiting) & set(mta.snapshot()):
            break
    assert sorted(subjects(mta.sink.wait_for(5))[2:]) == [f"waits {i}" for i in range(3)]


def test_max_active_counts_what_the_run_itself_handed_over(tmp_path, async_mta):
    mta = async_mta
    qr = pacing(Qrunner(tmp_path, mta, BY_SUBJECT), "max_active = 3")
    ids = {p: mta.queue_message(f"p{p}") for p in (10, 20, 30, 40, 50, 60)}
    slow_relay(mta, 4.0)  # what is handed over stays in delivery while the run goes on

    first = qr("run")

    assert first.code == 0, first.stderr
    left = [ids[p] for p in (10, 20, 30)]
    assert where(mta, left) == {queue_id: WAITING for queue_id in left}
    assert [w for w, _ in mta.snapshot().values()].count(WAITING) == 3
    assert set(wait_lines(first.stderr)) == set(left)
    assert "max_active (3) reached: the MTA is delivering 3 messages" in first.stderr
    assert sorted(subjects(mta.sink.wait_for(3, timeout=30))) == ["p40", "p50", "p60"]

    slow_relay(mta, 0)
    for p in (40, 50, 60):
        mta.wait_gone(ids[p])
    assert qr("run").code == 0
    assert sorted(subjects(mta.sink.wait_for(6))[3:]) == ["p10", "p20", "p30"]


def test_a_message_the_queue_manager_moves_into_active_while_it_is_counted_counts_once(tmp_path, monkeypatch):
    """Postfix renames a scheduled file from incoming/ to active/ whenever it likes: a count
    that reads incoming/ and then active/ may see it in both, and must count it once (a CI run
    saw "delivering 4" with three in delivery, and max_active handed over one too few)."""
    from qrunner.mta import postfix
    from qrunner.mta.postfix_queuefile import QueuePaths

    queue = tmp_path / "spool"
    for name in ("incoming", "active", "deferred"):
        (queue / name).mkdir(parents=True)
    for queue_id in ("4AB12C0001", "4AB12C0002"):
        (queue / "active" / queue_id).write_text("")
    (queue / "incoming" / "4AB12C0003").write_text("")
    backend = object.__new__(postfix.PostfixBackend)
    backend.queue_directory = str(queue)
    backend.paths = QueuePaths(str(queue), "deferred", 1)
    real_scandir = os.scandir

    def scandir_then_move(path):
        entries = list(real_scandir(path))
        if os.path.basename(path) == "incoming":  # the queue manager takes it right after incoming/ was read
            os.rename(queue / "incoming" / "4AB12C0003", queue / "active" / "4AB12C0003")
        return iter(entries)

    monkeypatch.setattr(postfix.os, "scandir", scandir_then_move)
    assert backend.delivering() == 3
    assert sorted(os.listdir(queue / "active")) == ["4AB12C0001", "4AB12C0002", "4AB12C0003"]


# -- max_run_seconds ---------------------------------------------------------------------


def test_a_run_whose_policy_took_max_run_seconds_hands_over_one_step_and_leaves_the_rest(tmp_path, memory):
    qr = Qrunner(tmp_path, memory, SLOW_FIRST_CALL)
    qr.config_path.write_text(qr.config_path.read_text().replace("script_timeout = 2", "script_timeout = 20"))
    pacing(qr, "max_run_seconds = 1")
    ids = {p: memory.queue_message(f"p{p}") for p in (10, 20, 30, 40)}

    first = qr("run")

    assert first.code == 0, first.stderr
    assert subjects(memory.sink.wait_for(1)) == ["p40"]  # a run always makes progress
    left = [ids[p] for p in (10, 20, 30)]
    assert where(memory, left) == {queue_id: WAITING for queue_id in left}
    assert wait_lines(first.stderr) == {q: "max_run_seconds (1) reached: left for the next run" for q in left}
    assert "deciding took longer than max_run_seconds (1)" in first.stderr

    qr.set_script(BY_SUBJECT)
    assert qr("run").code == 0
    assert subjects(memory.sink.wait_for(4)) == ["p40", "p30", "p20", "p10"]


def test_max_run_seconds_also_ends_a_strict_priority_wait(tmp_path, memory):
    qr = pacing(Qrunner(tmp_path, memory, BY_SUBJECT),
                "max_run_seconds = 1\nstrict_priority = true\nstrict_priority_wait = 600")
    slow = memory.queue_message("p100 big")
    low = [memory.queue_message(f"p50 {i}") for i in range(2)]
    memory.set(slow={slow: 120})

    result = qr("run")

    assert result.code == 0, result.stderr
    assert where(memory, [slow] + low) == {slow: ACTIVE, low[0]: WAITING, low[1]: WAITING}
    reason = "max_run_seconds (1) reached while priority 100 was still being delivered: left for the next run"
    assert wait_lines(result.stderr) == {queue_id: reason for queue_id in low}


# -- strict priority ---------------------------------------------------------------------


def test_with_strict_priority_every_priority_100_message_reaches_the_relay_before_any_priority_50(tmp_path, mta):
    qr = pacing(Qrunner(tmp_path, mta, BY_SUBJECT), "strict_priority = true")
    if mta.name == "exim":  # without strict priority its batches of both levels would run side by side
        qr.config_path.write_text(qr.config_path.read_text() + "overlap_priorities = true\n")
    low = [mta.queue_message(f"p50 #{i}") for i in range(10)]  # the lower level arrived first
    high = [mta.queue_message(f"p100 #{i}") for i in range(10)]
    if isinstance(mta, MemoryHarness):
        mta.set(slow={high[0]: 1.0})  # one big message: the level has not left while the rest would go
    else:
        mta.sink.data_delay = 0.2  # a relay that takes its time: the level is still being delivered

    result = qr("run")

    assert result.code == 0, result.stderr
    arrived = subjects(mta.sink.wait_for(20, timeout=60))
    levels = [s.split()[0] for s in arrived]
    assert levels == ["p100"] * 10 + ["p50"] * 10, arrived
    assert "action=wait" not in result.stderr
    for queue_id in low + high:
        mta.wait_gone(queue_id)


def test_without_strict_priority_a_slow_level_is_overtaken(tmp_path, memory):
    """The model delivers concurrently, as Postfix does: it shows what strict priority is for."""
    qr = Qrunner(tmp_path, memory, BY_SUBJECT)
    high = [memory.queue_message(f"p100 #{i}") for i in range(3)]
    [memory.queue_message(f"p50 #{i}") for i in range(3)]
    memory.set(slow={high[0]: 1.0})

    assert qr("run").code == 0

    arrived = [s.split()[0] for s in subjects(memory.sink.wait_for(6))]
    assert arrived.index("p50") < arrived.index("p100", 2)  # a p50 arrived before the slow p100


def test_a_level_that_does_not_leave_within_strict_priority_wait_leaves_the_rest_for_the_next_run(tmp_path,
                                                                                                   memory):
    qr = pacing(Qrunner(tmp_path, memory, BY_SUBJECT), "strict_priority = true\nstrict_priority_wait = 0.5")
    stuck = memory.queue_message("p100 stuck")
    quick = memory.queue_message("p100 quick")
    low = memory.queue_message("p50")
    memory.set(slow={stuck: 120})

    result = qr("run")

    assert result.code == 0, result.stderr
    assert where(memory, [stuck, quick, low]) == {stuck: ACTIVE, quick: None, low: WAITING}
    assert wait_lines(result.stderr) == {low: "strict_priority: priority 100 had not left the MTA's delivery after "
                                              "strict_priority_wait (0.5 s): left for the next run"}
    assert (f"strict_priority: 1 messages of priority 100 had not left the MTA's delivery after strict_priority_wait "
            f"(0.5 s): the lower priorities wait for the next run ({stuck})") in result.stderr


def test_strict_priority_waits_for_a_routed_copy_by_its_new_id(tmp_path, memory):
    qr = pacing(Qrunner(tmp_path, memory, ISP_OR_BACKUP), "strict_priority = true\nstrict_priority_wait = 0.5")
    qr.config_path.write_text(qr.config_path.read_text() + '[[sender]]\nid = 0\nname = "isp"\n'
                              '[[sender]]\nid = 1\nname = "backup"\ndefault = true\n')
    routed = memory.queue_message("p90 isp")
    low = memory.queue_message("p50 plain")
    memory.set(slow={routed: 120})  # its copy's delivery takes as long

    result = qr("run")

    assert result.code == 0, result.stderr
    [copy] = re.findall(rf"{routed}: action=route sender=isp priority=90 new_queue_id=(\S+)", result.stderr)
    assert where(memory, [copy, low]) == {copy: ACTIVE, low: WAITING}
    assert f"had not left the MTA's delivery after strict_priority_wait (0.5 s): the lower priorities wait for the " \
           f"next run ({copy})" in result.stderr


# -- metrics -------------------------------------------------------------------------------


def test_paced_messages_are_counted_and_shown_waiting_in_the_metrics(tmp_path, memory):
    metrics_file = tmp_path / "qrunner.prom"
    qr = pacing(Qrunner(tmp_path, memory, BY_SUBJECT), f'max_per_run = 1\nmetrics_file = "{metrics_file}"')
    [memory.queue_message(f"p{p}") for p in (10, 20, 30)]

    assert qr("run").code == 0
    first = read_metrics(metrics_file)
    assert qr("run").code == 0
    second = read_metrics(metrics_file)

    assert first[("qrunner_paced_total", frozenset({"sender": "default"}.items()))] == 2
    assert first[("qrunner_sent_total", frozenset({"sender": "default"}.items()))] == 1
    assert first[("qrunner_decisions", frozenset({"action": "wait", "sender": "default",
                                                  "priority_band": "1-25"}.items()))] == 2
    assert second[("qrunner_paced_total", frozenset({"sender": "default"}.items()))] == 3  # 2 + the one left now
    assert len(memory.sink.wait_for(2)) == 2


def test_what_max_active_stops_while_handing_over_is_waiting_in_the_metrics(tmp_path, memory):
    metrics_file = tmp_path / "qrunner.prom"
    qr = pacing(Qrunner(tmp_path, memory, BY_SUBJECT), f'max_active = 1\nmetrics_file = "{metrics_file}"')
    memory.set(delivery_seconds=60)
    [memory.queue_message(f"p{p}") for p in (60, 70)]

    assert qr("run").code == 0

    metrics = read_metrics(metrics_file)
    assert metrics[("qrunner_decisions", frozenset({"action": "send", "sender": "default",
                                                    "priority_band": "51-75"}.items()))] == 1
    assert metrics[("qrunner_decisions", frozenset({"action": "wait", "sender": "default",
                                                    "priority_band": "51-75"}.items()))] == 1
    assert metrics[("qrunner_paced_total", frozenset({"sender": "default"}.items()))] == 1


def read_metrics(path) -> dict:
    """(name, labels) -> value, as Prometheus would scrape them (prometheus_client's parser)."""
    with open(path) as f:
        return {(sample.name, frozenset(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(f.read()) for sample in family.samples}


# -- the settings ------------------------------------------------------------------------


@pytest.mark.parametrize("text, key", [
    ("max_per_run = -1\n", "max_per_run"),
    ("max_per_run = 1.5\n", "max_per_run"),
    ("max_per_run = '10'\n", "max_per_run"),
    ("max_active = -3\n", "max_active"),
    ("max_active = true\n", "max_active"),
    ("max_run_seconds = -1\n", "max_run_seconds"),
    ("max_run_seconds = 'long'\n", "max_run_seconds"),
    ("strict_priority = 'yes'\n", "strict_priority"),
    ("strict_priority_wait = 0\n", "strict_priority_wait"),
    ("[[sender]]\nid = 0\nname = 'a'\nmax_per_run = -1\n", "sender #1.max_per_run"),
    ("[[sender]]\nid = 0\nname = 'a'\nmax_per_run = 'x'\n", "sender #1.max_per_run"),
])
def test_a_bad_pacing_setting_is_one_sentence_naming_the_key(capsys, tmp_path, no_default_config, text, key):
    config = write_config(tmp_path, text)
    snapshot = write_snapshot(tmp_path, [record("Q1")])
    script = tmp_path / "allow.lua"
    script.write_text(ALLOW_ALL)
    code, out, err = run_cli(capsys, ["--config", str(config), "plan", "--queue-file", str(snapshot),
                                      "--script", str(script)])
    assert code == 78, err
    assert out == "" and "Traceback" not in err
    assert err.startswith("qrunner: ") and f"'{key}'" in err and err.count("\n") == 1
