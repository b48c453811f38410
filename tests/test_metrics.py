"""The Prometheus textfile (setting ``metrics_file``), parsed with prometheus_client's own parser (issue 11, point 1).

The values are checked against what the MTA's own tools say of the same
queue (``postqueue -j``, ``exim -bp``; the memory queue's file), not only
the syntax.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from memory_harness import MemoryHarness
from mta_harness import EximHarness, PostfixHarness
from qrunner_e2e import Qrunner

POLICY = """
function CheckFile(f, a, s, c, rp, r, h)
  local subject = h.subject or ""
  a.Priority = tonumber(subject:match("p(%d+)")) or 50
  if subject:find("hold") then a.SkipSend = 1; a.Reason = "subject says hold" end
  if subject:find("boom") then error("boom") end
  if sendername == "isp" and not subject:find("isp") then a.SkipSend = 1; a.Reason = "not for isp" end
  return a
end
"""
SENDERS = '[[sender]]\nid = 0\nname = "isp"\n[[sender]]\nid = 1\nname = "backup"\ndefault = true\n'


def read_metrics(path) -> dict:
    """(name, frozenset of labels) -> value, as Prometheus would scrape them."""
    with open(path) as f:
        text = f.read()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(metrics, name, **labels):
    return metrics[(name, frozenset(labels.items()))]


def qrunner_with_metrics(tmp_path, mta, senders=""):
    metrics_file = tmp_path / "textfile" / "qrunner.prom"
    metrics_file.parent.mkdir()
    qr = Qrunner(tmp_path, mta, POLICY, extra_config=f'metrics_file = "{metrics_file}"')
    if senders:
        qr.config_path.write_text(qr.config_path.read_text() + senders)
    return qr, metrics_file


@pytest.fixture
def memory(tmp_path):
    return MemoryHarness(str(tmp_path / "queue"))


def memory_queue_count(mta) -> int:
    return len(mta.sink._queue()["messages"])


def test_metrics_describe_the_run_and_count_across_runs(tmp_path, memory):
    mta = memory
    qr, metrics_file = qrunner_with_metrics(tmp_path, mta, SENDERS)
    held = mta.queue_message("please hold")
    mta.queue_message("p90 for isp")
    mta.queue_message("p10 plain")
    listed_by_the_mta = memory_queue_count(mta)

    assert qr("run", "--dry-run").code == 0
    assert not metrics_file.exists()  # a dry run writes no metrics
    umask = os.umask(0o077)  # the unit's UMask=0077
    try:
        assert qr("run").code == 0
    finally:
        os.umask(umask)

    m = read_metrics(metrics_file)
    assert value(m, "qrunner_queue_messages") == listed_by_the_mta == 3
    assert value(m, "qrunner_listed_messages") == 3
    assert value(m, "qrunner_decisions", action="send", sender="isp", priority_band="76-100") == 1
    assert value(m, "qrunner_decisions", action="send", sender="backup", priority_band="1-25") == 1
    assert value(m, "qrunner_decisions", action="hold", sender="isp,backup", priority_band="26-50") == 1
    assert value(m, "qrunner_held_messages", reason_class="policy_skip") == 1
    assert value(m, "qrunner_held_messages", reason_class="policy_error") == 0
    assert value(m, "qrunner_sent_total", sender="isp") == 1 and value(m, "qrunner_routed_total", sender="isp") == 1
    assert value(m, "qrunner_sent_total", sender="backup") == 1
    assert value(m, "qrunner_held_total", sender="isp,backup") == 1
    assert value(m, "qrunner_gated") == 1
    assert value(m, "qrunner_last_run_exit_code", command="run") == 0
    first_success = value(m, "qrunner_last_success_timestamp_seconds", command="run")
    assert value(m, "qrunner_oldest_hold_age_seconds") > 0
    assert oct(os.stat(metrics_file).st_mode & 0o777) == "0o644"  # node_exporter reads it as another user, umask or not

    mta.queue_message("boom")
    assert qr("run").code == 1  # a policy error: the run still completed its plan
    m = read_metrics(metrics_file)
    assert value(m, "qrunner_held_total", sender="isp,backup") == 2  # the kept hold is not counted again
    assert value(m, "qrunner_policy_errors_total", sender="isp") == 1
    assert value(m, "qrunner_held_messages", reason_class="policy_error") == 1
    assert value(m, "qrunner_last_run_exit_code", command="run") == 1
    assert value(m, "qrunner_last_run_policy_errors", command="run") == 1
    assert value(m, "qrunner_last_success_timestamp_seconds", command="run") > first_success  # no alert for that

    assert qr("release", held).code == 0
    m = read_metrics(metrics_file)
    assert value(m, "qrunner_released_total", sender="") == 1
    assert value(m, "qrunner_gated") == 1  # a release asks the gate too
    assert value(m, "qrunner_listed_messages") == 2  # the plan's gauges stay as the last run saw them:
    assert value(m, "qrunner_decisions", action="hold", sender="isp,backup", priority_band="26-50") == 2  # 2 holds
    assert value(m, "qrunner_sent_total", sender="isp") == 1  # the counters survived the commands between
    assert {labels for name, labels in m if name == "qrunner_last_run_exit_code"} == {
        frozenset({("command", "run")}), frozenset({("command", "release")})}  # one command's file tells of all


def test_the_metrics_file_is_replaced_whole_or_not_at_all(tmp_path, memory):
    """A run killed between writing the new metrics and putting them in place leaves the old file, whole and 0644.

    node_exporter reads ``*.prom`` files only: the new text is written aside under another name, then renamed.
    """
    qr, metrics_file = qrunner_with_metrics(tmp_path, memory)
    memory.queue_message("p90 first")
    umask = os.umask(0o077)  # the unit's UMask=0077
    try:
        assert qr("run").code == 0
        before = metrics_file.read_bytes()
        memory.queue_message("please hold")
        killed = qr.run_killed_at("qrunner.atomic:os.fsync")  # the new text written aside, not yet renamed
    finally:
        os.umask(umask)
    assert killed.code == -9, killed.stderr
    assert metrics_file.read_bytes() == before
    assert oct(os.stat(metrics_file).st_mode & 0o777) == "0o644"
    assert [p.name for p in metrics_file.parent.iterdir() if p.name.endswith(".prom")] == ["qrunner.prom"]
    assert value(read_metrics(metrics_file), "qrunner_held_messages", reason_class="policy_skip") == 0

    assert qr("run").code == 0
    assert value(read_metrics(metrics_file), "qrunner_held_messages", reason_class="policy_skip") == 1
    assert oct(os.stat(metrics_file).st_mode & 0o777) == "0o644"


def test_a_failed_run_is_no_success(tmp_path, memory):
    mta = memory
    qr, metrics_file = qrunner_with_metrics(tmp_path, mta)
    mta.queue_message("please hold")
    mta.queue_message("please hold too")
    mta.set(fail={"hold": "the MTA stopped"})
    assert qr("run").code == 69
    m = read_metrics(metrics_file)
    assert value(m, "qrunner_last_run_exit_code", command="run") == 69
    assert ("qrunner_last_success_timestamp_seconds", frozenset({("command", "run")})) not in m


@pytest.mark.parametrize("which", ["postfix", "exim"])
def test_metrics_agree_with_the_mtas_own_listing(tmp_path, request, which):
    if which == "postfix":
        mta = PostfixHarness(request.getfixturevalue("postfix"), request.getfixturevalue("smtp_sink"))
    else:
        mta = EximHarness(request.getfixturevalue("exim"), request.getfixturevalue("exim_sink"))
    qr, metrics_file = qrunner_with_metrics(tmp_path, mta)
    for subject in ("please hold", "hold this too", "p80 go"):
        mta.queue_message(subject)
    before = len(mta.snapshot())  # postqueue -j / exim -bp

    assert qr("run").code == 0

    m = read_metrics(metrics_file)
    assert value(m, "qrunner_queue_messages") == before == 3
    if which == "postfix":
        listing = subprocess.run(["postqueue", "-c", mta.instance.config_directory, "-j"], capture_output=True,
                                 text=True, check=True).stdout
        held_by_the_mta = sum(1 for line in listing.splitlines() if json.loads(line)["queue_name"] == "hold")
    else:
        held_by_the_mta = sum(1 for entry in mta.instance.queue() if entry["frozen"])
    assert value(m, "qrunner_held_messages", reason_class="policy_skip") == held_by_the_mta == 2
    assert value(m, "qrunner_decisions", action="send", sender="default", priority_band="76-100") == 1
    assert value(m, "qrunner_sent_total", sender="default") == 1


def test_the_manuals_alert_rules_and_the_dashboard_use_only_names_the_file_has(tmp_path, memory):
    import re

    qr, metrics_file = qrunner_with_metrics(tmp_path, memory)
    memory.queue_message("please hold")
    assert qr("run").code == 0
    families = list(text_string_to_metric_families(metrics_file.read_text()))
    written = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "man", "qrunner.8.md")) as f:  # qrunner(8), METRICS
        rules = f.read().split("- name: qrunner", 1)[1].split("```", 1)[0]
    with open(os.path.join(root, "contrib", "grafana", "qrunner.json")) as f:
        dashboard = json.load(f)
    exprs = re.findall(r"expr: (.*)", rules) + [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    for expr in exprs:
        for name in re.findall(r"\bqrunner_\w+", expr):
            assert name in written, (name, expr)
