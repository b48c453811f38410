"""Several senders: each message leaves through the sender whose pass took it, on both real MTAs.

Two (or three) SMTP sinks on loopback ports stand for the senders' relays.
Exim routes by contrib/exim's router reading qrunner's lookup file; Postfix
by re-injection into each sender's loopback listener (contrib/postfix's
master.cf lines).
"""

from __future__ import annotations

import os
import tempfile

import pytest

from mta_harness import EximHarness
from qrunner_e2e import Qrunner, make_message
from smtp_sink import SmtpSink

SEED_EXAMPLE_2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "seed_example2.lua")

THREE_SENDERS = """
function CheckFile(f, a, size, created, from, rcpts, headers)
  local subject = headers.subject or ""
  if senderid == 0 then a.SkipSend = 1; a.Reason = "first never sends" end
  if senderid == 1 and not subject:find("middle") then a.SkipSend = 1; a.Reason = "not for the middle" end
  return a
end
"""


@pytest.fixture
def sinks():
    started = [SmtpSink().start() for _ in range(3)]
    yield started
    for sink in started:
        sink.stop()


def world_readable_state_dir() -> str:
    """Exim's delivery process (Debian-exim) must reach the routes file, as it would under /var/lib."""
    directory = tempfile.mkdtemp(prefix="qrunner-state-")
    os.chmod(directory, 0o711)
    return os.path.join(directory, "state")


def exim_routes(exim, state_dir: str, sinks) -> None:
    """contrib/exim's router, first, and one smtp transport per sink."""
    routes = os.path.join(state_dir, "exim-routes")
    exim.extra_routers = f"""qrunner_route:
  driver = accept
  domains = ! +local_domains
  condition = ${{if and{{{{eq{{$queue_name}}{{qrunner}}}} {{!eq{{${{lookup{{$message_exim_id}}lsearch{{{routes}}}{{$value}}{{}}}}}}{{}}}}}}}}
  transport = ${{lookup{{$message_exim_id}}lsearch{{{routes}}}}}
  no_more
"""
    exim.extra_transports = "".join(f"""to_sink_{i}:
  driver = smtp
  hosts = 127.0.0.1
  hosts_override
  port = {sink.port}
  allow_localhost
  hosts_avoid_tls = *

""" for i, sink in enumerate(sinks))
    exim.write_config()


def exim_senders(names) -> str:
    return "".join(f'[[sender]]\nid = {i}\nname = "{name}"\n[sender.exim]\ntransport = "to_sink_{i}"\n'
                   for i, name in enumerate(names))


def exim_qrunner(tmp_path, exim, exim_sink, sinks, script_text, names):
    mta = EximHarness(exim, exim_sink)
    state_dir = world_readable_state_dir()
    exim_routes(exim, state_dir, sinks)
    qr = Qrunner(tmp_path, mta, script_text)
    qr.state_dir = state_dir
    text = qr.config_path.read_text().replace(f'state_dir = "{tmp_path / "state"}"', f'state_dir = "{state_dir}"')
    qr.config_path.write_text(text + exim_senders(names))
    return mta, qr


def test_exim_seed_example_2_sends_big_mail_through_sender_0_and_small_through_sender_1(
        tmp_path, exim, exim_sink, sinks):
    with open(SEED_EXAMPLE_2) as f:
        script = f.read()
    mta, qr = exim_qrunner(tmp_path, exim, exim_sink, sinks, script, ["big", "small"])
    big = exim.submit("carol@qrunner-test.localdomain", ["x@example.net", "y@example.org"],
                      make_message("big one", size=60000, to="x@example.net, y@example.org"))
    small = exim.submit("dave@qrunner-test.localdomain", ["z@example.com"], make_message("small one", size=100))

    result = qr("run")

    assert result.code == 0, result.stderr
    [at_a] = sinks[0].wait_for(1)
    [at_b] = sinks[1].wait_for(1)
    assert at_a.header("Subject") == b"big one" and at_b.header("Subject") == b"small one"
    assert at_a.mail_from == "carol@qrunner-test.localdomain" and sorted(at_a.rcpt_tos) == ["x@example.net", "y@example.org"]
    assert at_b.mail_from == "dave@qrunner-test.localdomain" and at_b.rcpt_tos == ["z@example.com"]
    assert exim_sink.messages == []  # nothing went by the default route
    assert f"{big}: action=send sender=big" in result.stderr and f"{small}: action=send sender=small" in result.stderr
    mta.wait_gone(big)
    mta.wait_gone(small)


def test_exim_three_senders_the_middle_takes_what_the_first_skips(tmp_path, exim, exim_sink, sinks):
    mta, qr = exim_qrunner(tmp_path, exim, exim_sink, sinks, THREE_SENDERS, ["first", "middle", "last"])
    middle = mta.queue_message("for the middle")
    last = mta.queue_message("for the last")

    result = qr("run")

    assert result.code == 0, result.stderr
    assert [m.header("Subject") for m in sinks[1].wait_for(1)] == [b"for the middle"]
    assert [m.header("Subject") for m in sinks[2].wait_for(1)] == [b"for the last"]
    assert sinks[0].messages == [] and exim_sink.messages == []
    assert f"{middle}: action=send sender=middle" in result.stderr
    assert f"{last}: action=send sender=last" in result.stderr


def test_exim_routes_file_always_exists_and_lists_only_routed_messages(tmp_path, exim, exim_sink, sinks):
    mta, qr = exim_qrunner(tmp_path, exim, exim_sink, sinks, THREE_SENDERS, ["first", "middle", "last"])
    routes = os.path.join(qr.state_dir, "exim-routes")
    assert qr("run", "--dry-run").code == 0
    assert not os.path.exists(routes)  # a dry run writes nothing
    assert qr("run").code == 0
    assert os.path.exists(routes) and open(routes).read() == ""
    assert oct(os.stat(routes).st_mode & 0o777) == "0o644"


def test_a_sender_without_a_route_for_the_mta_is_a_config_error(tmp_path, exim, exim_sink):
    mta = EximHarness(exim, exim_sink)
    qr = Qrunner(tmp_path, mta)
    qr.config_path.write_text(qr.config_path.read_text() +
                              '[[sender]]\nid = 0\nname = "isp"\n[sender.postfix]\nlistener = "127.0.0.1:10026"\n'
                              'transport = "relay-isp"\nnexthop = "[127.0.0.1]:2525"\n'
                              '[[sender]]\nid = 1\nname = "backup"\ndefault = true\n')
    mta.queue_message("x")

    result = qr("run")

    assert result.code == 78
    assert "sender 0:isp has no [sender.exim] route" in result.stderr
