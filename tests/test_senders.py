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
from smtp_sink import SmtpSink, wait_for_greeting

SEED_EXAMPLE_2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "seed_example2.lua")

SKIP_OTHERS = "function CheckFile(f, a) return a end\n"

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


def routes_file(state_dir: str) -> str:
    """Where the README says qrunner keeps Exim's routes file: STATE_DIR-exim/exim-routes, beside state_dir."""
    return os.path.normpath(state_dir) + "-exim/exim-routes"


def world_readable_state_dir() -> str:
    """Exim's delivery process (Debian-exim) must reach the routes file beside state_dir, as under /var/lib."""
    directory = tempfile.mkdtemp(prefix="qrunner-state-")
    os.chmod(directory, 0o711)
    return os.path.join(directory, "state")


CONTRIB_GATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "contrib", "exim",
                            "exim-gate.conf")


def contrib_routers(routes_file: str) -> str:
    """contrib/exim's two routers exactly as shipped, but for the routes file's path."""
    text = open(CONTRIB_GATE).read()
    start = text.index("qrunner_route:")
    end = text.index("# And one transport per sender")
    return text[start:end].replace("/var/lib/qrunner-exim/exim-routes", routes_file)


def exim_routes(exim, state_dir: str, sinks) -> None:
    """contrib/exim's routers, first, and one smtp transport per sink."""
    exim.extra_routers = contrib_routers(routes_file(state_dir))
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
    routes = open(routes_file(qr.state_dir)).read()
    assert sorted(routes.splitlines()) == sorted([f"{big}: to_sink_0", f"{small}: to_sink_1"])
    status = qr("status").stdout
    assert "senders: 0:big (exim: transport to_sink_0); 1:small (exim: transport to_sink_1)" in status


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
    routes = routes_file(qr.state_dir)
    assert qr("run", "--dry-run").code == 0
    assert not os.path.exists(routes)  # a dry run writes nothing
    assert qr("run").code == 0
    assert os.path.exists(routes) and open(routes).read() == ""
    assert oct(os.stat(routes).st_mode & 0o777) == "0o644"


def test_exim_state_dir_is_roots_alone_and_the_routes_file_has_a_directory_of_its_own(tmp_path, exim, exim_sink,
                                                                                        sinks):
    """Under the unit's UMask=0077: state 0700 (database, lock 0600), the routes file 0644 in a 0711 directory."""
    mta, qr = exim_qrunner(tmp_path, exim, exim_sink, sinks, THREE_SENDERS, ["first", "middle", "last"])
    queue_id = mta.queue_message("for the last")
    umask = os.umask(0o077)
    try:
        result = qr("run")
    finally:
        os.umask(umask)
    assert result.code == 0, result.stderr
    [got] = sinks[2].wait_for(1)  # Exim's delivery user read the routes file
    assert got.header("Subject") == b"for the last" and exim_sink.messages == []
    modes = {name: oct(os.stat(path).st_mode & 0o777) for name, path in [
        ("state", qr.state_dir), ("database", os.path.join(qr.state_dir, "qrunner.sqlite")),
        ("lock", os.path.join(qr.state_dir, "qrunner.lock")),
        ("routes directory", os.path.dirname(routes_file(qr.state_dir))), ("routes", routes_file(qr.state_dir))]}
    assert modes == {"state": "0o700", "database": "0o600", "lock": "0o600", "routes directory": "0o711",
                     "routes": "0o644"}
    assert sorted(os.listdir(qr.state_dir)) == ["qrunner.lock", "qrunner.sqlite"]
    assert os.listdir(os.path.dirname(routes_file(qr.state_dir))) == ["exim-routes"]  # no temporary file left
    mta.wait_gone(queue_id)


def test_exim_routes_file_is_replaced_whole_or_not_at_all(tmp_path, exim, exim_sink, sinks):
    """A run killed between writing the new routes and putting them in place: Exim still reads the old list, whole."""
    mta, qr = exim_qrunner(tmp_path, exim, exim_sink, sinks, THREE_SENDERS, ["first", "middle", "last"])
    assert qr("run").code == 0  # writes the (empty) routes file
    routes = routes_file(qr.state_dir)
    assert open(routes).read() == ""
    queue_id = mta.queue_message("for the last")

    killed = qr.run_killed_at("qrunner.atomic:os.fsync")  # the dispatch's routes written aside, not yet renamed

    assert killed.code == -9, killed.stderr
    assert open(routes).read() == "" and oct(os.stat(routes).st_mode & 0o777) == "0o644"
    assert [name for name in os.listdir(os.path.dirname(routes)) if not name.endswith(".tmp")] == ["exim-routes"]
    assert mta.where(queue_id) == "waiting"  # not dispatched: the kill came before any exim -Mc
    assert all(s.messages == [] for s in sinks) and exim_sink.messages == []


def test_exim_upgrade_moves_the_routes_file_and_exim_never_finds_it_missing(tmp_path, exim, exim_sink, sinks):
    """A state directory of the release before: routes file inside it, and the router naming that path.

    The first run writes the new file and keeps the old one up to date and reachable (the router still reads
    it: routed mail goes the right way, even with the state directory 0700 as the new unit makes it) and warns; once the router names the new path, the old file goes and the state directory
    is 0700 again.
    """
    mta, qr = exim_qrunner(tmp_path, exim, exim_sink, sinks, THREE_SENDERS, ["first", "middle", "last"])
    old = os.path.join(qr.state_dir, "exim-routes")
    os.makedirs(qr.state_dir, mode=0o700)  # as the new unit's StateDirectoryMode leaves it at each start
    os.chmod(qr.state_dir, 0o700)
    with open(old, "w") as f:
        f.write("")
    os.chmod(old, 0o644)
    exim.extra_routers = contrib_routers(old)
    exim.write_config()
    first = mta.queue_message("for the last, old router")

    result = qr("run")

    assert result.code == 0, result.stderr
    assert f"Exim's configuration still reads qrunner's routes file at its old path {old}" in result.stderr
    [got] = sinks[2].wait_for(1)  # the router read the old file, kept up to date
    assert got.header("Subject") == b"for the last, old router" and exim_sink.messages == []
    assert open(old).read() == open(routes_file(qr.state_dir)).read() == f"{first}: to_sink_2\n"
    assert "gated: yes" in qr("status").stdout
    mta.wait_gone(first)

    exim.extra_routers = contrib_routers(routes_file(qr.state_dir))  # the admin updates the router
    exim.write_config()
    second = mta.queue_message("for the last, new router")

    result = qr("run")

    assert result.code == 0, result.stderr
    assert "old path" not in result.stderr
    assert not os.path.exists(old)
    assert oct(os.stat(qr.state_dir).st_mode & 0o777) == "0o700"
    assert [m.header("Subject") for m in sinks[2].wait_for(2)] == [b"for the last, old router",
                                                                   b"for the last, new router"]
    assert exim_sink.messages == []
    mta.wait_gone(second)


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


# -- Postfix: re-injection into each sender's loopback listener ----------------------------

import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from postfix_instance import free_loopback_port  # noqa: E402
from qrunner_e2e import queue_message, queue_state  # noqa: E402


# listener port -> the nexthop its content_filter stamps: a sender's [sender.postfix] route must name it,
# since qrunner checks it against master.cf and recognises the sender's copies by it.
NEXTHOPS = {}


@pytest.fixture(scope="module")
def relays(postfix_available):
    started = [SmtpSink().start() for _ in range(3)]
    yield started
    for sink in started:
        sink.stop()


@pytest.fixture(scope="module")
def listener_ports(_module_postfix, relays):
    """One re-injection listener per relay (ports[i] routes to relays[i]), one whose relay is down,
    and one (index 4) that refuses the recipient refused@example.net."""
    ports = [free_loopback_port() for _ in relays]
    for i, (port, relay) in enumerate(zip(ports, relays)):
        NEXTHOPS[port] = f"[127.0.0.1]:{relay.port}"
        _module_postfix.add_reinjection_listener(port, f"qr-sender-{i}", NEXTHOPS[port])
    dead = free_loopback_port()
    NEXTHOPS[dead] = f"[127.0.0.1]:{free_loopback_port()}"
    _module_postfix.add_reinjection_listener(dead, "qr-sender-dead", NEXTHOPS[dead])
    refusing = free_loopback_port()
    NEXTHOPS[refusing] = f"[127.0.0.1]:{relays[0].port}"
    _module_postfix.add_reinjection_listener(
        refusing, "qr-sender-0", NEXTHOPS[refusing],
        {"smtpd_recipient_restrictions": "check_recipient_access,inline:{refused@example.net=REJECT},"
                                         "permit_mynetworks,reject"})
    for port in ports + [dead, refusing]:
        wait_for_greeting(port)
    return ports + [dead, refusing]


@pytest.fixture
def pf(postfix, smtp_sink, relays, listener_ports):
    for relay in relays:
        relay.clear()
    yield postfix


def postfix_senders(names, ports, routes=None) -> str:
    text = ""
    for i, name in enumerate(names):
        index = routes[i] if routes else i
        text += (f'[[sender]]\nid = {i}\nname = "{name}"\n[sender.postfix]\nlistener = "127.0.0.1:{ports[index]}"\n'
                 f'transport = "qr-sender-{index if index < 3 else "dead" if index == 3 else 0}"\n'
                 f'nexthop = "{NEXTHOPS.get(ports[index], "[127.0.0.1]:1")}"\n')
    return text


def postfix_qrunner(tmp_path, postfix, script_text, names, ports, routes=None):
    qr = Qrunner(tmp_path, postfix, script_text)
    qr.config_path.write_text(qr.config_path.read_text() + postfix_senders(names, ports, routes))
    return qr


def test_postfix_seed_example_2_sends_big_mail_through_sender_0_and_small_through_sender_1(
        tmp_path, pf, smtp_sink, relays, listener_ports):
    with open(SEED_EXAMPLE_2) as f:
        qr = postfix_qrunner(tmp_path, pf, f.read(), ["big", "small"], listener_ports)
    big = queue_message(pf, "big one", size=60000, to=("x@example.net", "y@example.org"),
                        sender="carol@qrunner-test.localdomain")
    small = queue_message(pf, "small one", size=100, sender="dave@qrunner-test.localdomain")

    result = qr("run")

    assert result.code == 0, result.stderr
    [at_a] = relays[0].wait_for(1)
    [at_b] = relays[1].wait_for(1)
    assert at_a.header("Subject") == b"big one" and at_b.header("Subject") == b"small one"
    assert at_a.mail_from == "carol@qrunner-test.localdomain" and sorted(at_a.rcpt_tos) == ["x@example.net", "y@example.org"]
    assert at_b.mail_from == "dave@qrunner-test.localdomain" and at_b.rcpt_tos == ["bob@example.net"]
    assert smtp_sink.messages == []  # nothing went by the default (gated) route
    for original in (big, small):
        line = [ln for ln in result.stderr.splitlines() if f"{original}: action=route" in ln]
        assert line and "new_queue_id=" in line[0]  # old and new queue id on one line
        assert original not in queue_state(pf)


def test_postfix_dsn_parameters_survive_the_hand_over(tmp_path, pf, relays, listener_ports):
    qr = postfix_qrunner(tmp_path, pf, "function CheckFile(f, a) return a end\n", ["isp"], listener_ports)
    queue_id = pf.submit("erin@qrunner-test.localdomain", ["f@example.net"], make_message("dsn"),
                         sendmail_options=["-N", "success,delay,failure", "-R", "hdrs", "-V", "env-42"])
    pf.wait_deferred([queue_id])

    result = qr("run")

    assert result.code == 0, result.stderr
    [copy] = relays[0].wait_for(1)
    mail = " ".join(copy.mail_options).upper()
    assert "RET=HDRS" in mail and "ENVID=ENV-42" in mail
    rcpt = " ".join(copy.rcpt_options["f@example.net"]).upper()
    notify = [p for p in rcpt.split() if p.startswith("NOTIFY=")]
    assert notify and set(notify[0][7:].split(",")) == {"SUCCESS", "DELAY", "FAILURE"}
    assert "ORCPT=RFC822;F@EXAMPLE.NET" in rcpt


def test_postfix_listener_down_leaves_the_original_held_with_the_reason(tmp_path, pf, relays, listener_ports):
    closed = [free_loopback_port()]
    qr = postfix_qrunner(tmp_path, pf, "function CheckFile(f, a) return a end\n", ["isp"], closed)
    queue_id = queue_message(pf, "nowhere to go")
    before = queue_state(pf)[queue_id][1]

    result = qr("run")

    assert result.code == 1
    assert queue_state(pf)[queue_id] == ("hold", before)
    status = qr("status").stdout
    assert queue_id in status and "hand-over to sender isp failed" in status
    assert all(r.messages == [] for r in relays)


def test_postfix_three_senders_the_middle_takes_what_the_first_skips(tmp_path, pf, smtp_sink, relays,
                                                                      listener_ports):
    qr = postfix_qrunner(tmp_path, pf, THREE_SENDERS, ["first", "middle", "last"], listener_ports)
    middle = queue_message(pf, "for the middle")
    last = queue_message(pf, "for the last")

    result = qr("run")

    assert result.code == 0, result.stderr
    assert [m.header("Subject") for m in relays[1].wait_for(1)] == [b"for the middle"]
    assert [m.header("Subject") for m in relays[2].wait_for(1)] == [b"for the last"]
    assert relays[0].messages == [] and smtp_sink.messages == []
    assert f"{middle}: action=route sender=middle" in result.stderr
    assert f"{last}: action=route sender=last" in result.stderr


def test_postfix_routed_copy_is_never_decided_again(tmp_path, pf, listener_ports):
    """A copy whose relay is down stays deferred on its route; later runs leave it to Postfix."""
    qr = postfix_qrunner(tmp_path, pf, SKIP_OTHERS, ["isp"], listener_ports, routes=[3])
    original = queue_message(pf, "route is down")
    first = qr("run")
    assert first.code == 0, first.stderr
    new_id = first.stderr.split("new_queue_id=")[1].split()[0]
    pf.wait_deferred([new_id])

    second = qr("run")
    os.remove(os.path.join(qr.state_dir, "qrunner.sqlite"))  # qrunner's records are lost: the queue file says
    third = qr("run")

    for later in (second, third):
        assert later.code == 0, later.stderr
        assert new_id not in later.stderr and "listed=0" in later.stderr
    assert "content_filter: qr-sender-dead:" in subprocess.run(
        ["postcat", "-c", pf.config_directory, "-eq", new_id], capture_output=True, text=True).stdout
    assert queue_state(pf)[new_id][0] == "deferred" and original not in queue_state(pf)


def test_postfix_killed_between_the_record_and_the_delete_keeps_the_copy_on_hold_until_the_next_run(
        tmp_path, pf, relays, listener_ports):
    qr = postfix_qrunner(tmp_path, pf, "function CheckFile(f, a) return a end\n", ["isp"], listener_ports)
    queue_id = queue_message(pf, "crash test")

    killed = qr.run_killed_at("qrunner.mta.postfix:PostfixBackend.remove")  # copy accepted and recorded

    assert killed.code == -signal.SIGKILL
    queues = queue_state(pf)
    assert queues[queue_id][0] == "hold"  # the original is still here, and still qrunner's
    (copy,) = [q for q in queues if q != queue_id]
    assert queues[copy][0] == "hold"  # the copy waits on the listener's hold: it cannot leave beside its original
    assert queue_id in qr("status").stdout
    time.sleep(1)
    assert relays[0].messages == []
    again = qr("run")
    assert again.code == 0, again.stderr
    assert f"{queue_id}: action=delete" in again.stderr  # the copy was recorded: delete, don't send twice
    assert f"{copy}: action=release" in again.stderr
    assert [m.header("Subject") for m in relays[0].wait_for(1)] == [b"crash test"]
    pf.wait_gone([queue_id, copy])
    time.sleep(1)
    assert len(relays[0].messages) == 1


def test_postfix_a_recipient_the_listener_refuses_leaves_the_original_held_and_unchanged(
        tmp_path, pf, relays, listener_ports):
    qr = postfix_qrunner(tmp_path, pf, SKIP_OTHERS, ["isp"], listener_ports, routes=[4])
    queue_id = queue_message(pf, "one refused", to=("ok@example.net", "refused@example.net"))
    before = queue_state(pf)[queue_id][1]

    result = qr("run")

    assert result.code == 1
    assert queue_state(pf)[queue_id] == ("hold", before)
    status = qr("status").stdout
    assert "hand-over to sender isp failed" in status and "refused@example.net" in status
    time.sleep(1)
    assert relays[0].messages == []  # nothing half-sent


def test_postfix_flush_ignoring_the_policy_uses_the_first_senders_route_when_none_is_default(
        tmp_path, pf, smtp_sink, relays, listener_ports):
    qr = postfix_qrunner(tmp_path, pf, "function CheckFile(f, a) a.SkipSend = 1 return a end\n",
                         ["isp", "backup"], listener_ports)
    queue_id = queue_message(pf, "flush me")
    assert qr("run").code == 0

    forced = qr("flush", queue_id, "--ignore-policy")

    assert forced.code == 0, forced.stderr
    assert [m.header("Subject") for m in relays[0].wait_for(1)] == [b"flush me"]
    assert smtp_sink.messages == [] and f"{queue_id}: action=route sender=isp" in forced.stderr


def test_postfix_a_sender_transport_in_defer_transports_is_a_config_error(tmp_path, pf, listener_ports):
    pf.set(defer_transports="smtp, qr-sender-0")
    qr = postfix_qrunner(tmp_path, pf, SKIP_OTHERS, ["isp"], listener_ports)
    queue_message(pf, "x")
    for command in (["run"], ["plan"]):
        result = qr(*command)
        assert result.code == 78, result.stderr
        assert "qr-sender-0 is in Postfix's defer_transports" in result.stderr


def test_live_plan_with_an_unrouted_sender_is_a_config_error(tmp_path, pf, listener_ports):
    qr = Qrunner(tmp_path, pf, SKIP_OTHERS)
    qr.config_path.write_text(qr.config_path.read_text() + '[[sender]]\nid = 0\nname = "a"\n[[sender]]\nid = 1\nname = "b"\n')
    result = qr("plan")
    assert result.code == 78 and "sender 0:a has no [sender.postfix] route" in result.stderr


def test_exim_routes_file_out_of_reach_of_exims_delivery_user_is_refused(tmp_path, exim, exim_sink, sinks):
    mta = EximHarness(exim, exim_sink)
    exim_routes(exim, str(tmp_path / "state"), sinks)
    qr = Qrunner(tmp_path, mta, THREE_SENDERS)  # state_dir under pytest's 0700 tmp directory
    qr.config_path.write_text(qr.config_path.read_text() + exim_senders(["first", "middle", "last"]))
    queue_id = mta.queue_message("for the middle")

    result = qr("run")

    assert result.code == 78, result.stderr
    assert "not searchable by other users" in result.stderr
    assert all(s.messages == [] for s in sinks) and exim_sink.messages == []
    assert mta.where(queue_id) == "waiting"


def test_exim_unreadable_routes_file_defers_instead_of_the_default_route(tmp_path, exim, exim_sink, sinks):
    """contrib's fail-closed router: with the file gone, qrunner's mail waits rather than leave the wrong way."""
    mta, qr = exim_qrunner(tmp_path, exim, exim_sink, sinks, THREE_SENDERS, ["first", "middle", "last"])
    queue_id = mta.queue_message("for the last")
    os.makedirs(qr.state_dir, exist_ok=True)
    routes = routes_file(qr.state_dir)
    if os.path.exists(routes):
        os.remove(routes)

    exim.deliver(queue_id)  # Exim on its own, the routes file missing

    assert queue_id in exim.queue_ids()
    assert exim_sink.messages == [] and all(s.messages == [] for s in sinks)
    assert "routes file" in exim.log_text()


def test_postfix_default_sender_goes_by_flush_beside_a_routed_sender(tmp_path, pf, smtp_sink, relays,
                                                                      listener_ports):
    script = "function CheckFile(f, a, size) if senderid == 0 and size < 50000 then a.SkipSend = 1 end return a end\n"
    qr = Qrunner(tmp_path, pf, script)
    qr.config_path.write_text(qr.config_path.read_text() + postfix_senders(["isp"], listener_ports) +
                              '[[sender]]\nid = 1\nname = "backup"\ndefault = true\n')
    big = queue_message(pf, "big", size=60000)
    small = queue_message(pf, "small", size=100)

    result = qr("run")
    plan_senders = qr("plan").stdout.splitlines()[-1]

    assert result.code == 0, result.stderr
    assert [m.header("Subject") for m in relays[0].wait_for(1)] == [b"big"]
    assert [m.header("Subject") for m in smtp_sink.wait_for(1)] == [b"small"]  # the MTA's own (gated) route
    assert f"{big}: action=route sender=isp" in result.stderr
    assert f"{small}: action=send sender=backup priority=50" in result.stderr
    assert plan_senders.startswith("senders: 0:isp (postfix: via 127.0.0.1:") and \
        "1:backup (default: the MTA's own routing)" in plan_senders


def test_exim_default_sender_goes_by_exims_own_routing_beside_a_routed_sender(tmp_path, exim, exim_sink, sinks):
    script = "function CheckFile(f, a, size) if senderid == 0 and size < 50000 then a.SkipSend = 1 end return a end\n"
    mta, qr = exim_qrunner(tmp_path, exim, exim_sink, sinks, script, ["isp"])
    qr.config_path.write_text(qr.config_path.read_text() + '[[sender]]\nid = 1\nname = "backup"\ndefault = true\n')
    big = mta.queue_message("big", size=60000)
    small = mta.queue_message("small", size=100)

    result = qr("run")

    assert result.code == 0, result.stderr
    assert [m.header("Subject") for m in sinks[0].wait_for(1)] == [b"big"]
    assert [m.header("Subject") for m in exim_sink.wait_for(1)] == [b"small"]  # Exim's usual router
    routes = open(routes_file(qr.state_dir)).read()
    assert routes == f"{big}: to_sink_0\n"  # the default sender's message is not listed
    assert small not in routes


def test_postfix_a_copy_is_known_by_the_route_in_its_queue_file_not_by_the_record_alone(
        tmp_path, pf, smtp_sink, relays, listener_ports):
    """A copy record naming a queue id Postfix gave to a new message must not hide that message from the policy."""
    from qrunner.decision import MessageKey
    from qrunner.state import State

    qr = postfix_qrunner(tmp_path, pf, "function CheckFile(f, a) return a end\n", ["isp"], listener_ports)
    queue_id = queue_message(pf, "reuses an old copy's id")
    state = State(qr.state_dir, f"postfix:{os.path.realpath(pf.queue_directory)}")
    state.record_copy(queue_id, MessageKey("B0000000000", 1), "isp")  # an earlier copy once had this id
    state.close()

    result = qr("run")

    assert result.code == 0, result.stderr
    assert f"{queue_id}: action=route sender=isp" in result.stderr
    assert [m.header("Subject") for m in relays[0].wait_for(1)] == [b"reuses an old copy's id"]


def test_postfix_a_route_that_is_not_the_listeners_is_a_config_error(tmp_path, pf, listener_ports):
    qr = Qrunner(tmp_path, pf, SKIP_OTHERS)
    qr.config_path.write_text(qr.config_path.read_text() + f'[[sender]]\nid = 0\nname = "isp"\n[sender.postfix]\n'
                              f'listener = "127.0.0.1:{listener_ports[0]}"\ntransport = "qr-sender-0"\n'
                              'nexthop = "[192.0.2.1]:25"\n')
    queue_message(pf, "x")
    for command in (["run"], ["plan"]):
        result = qr(*command)
        assert result.code == 78, result.stderr
        assert f"its listener 127.0.0.1:{listener_ports[0]} stamps content_filter=qr-sender-0:" in result.stderr


def test_postfix_release_all_removes_an_original_whose_copy_already_left(tmp_path, pf, smtp_sink, relays,
                                                                          listener_ports):
    """The way out after an interrupted hand-over: the original goes (its copy was accepted), it is not released;
    the copy, held by its listener until then, is released to its route."""
    qr = postfix_qrunner(tmp_path, pf, "function CheckFile(f, a) return a end\n", ["isp"], listener_ports)
    queue_id = queue_message(pf, "copied, then the kill")
    assert qr.run_killed_at("qrunner.mta.postfix:PostfixBackend.remove").code == -signal.SIGKILL
    assert queue_state(pf)[queue_id][0] == "hold"

    result = qr("release", "--all")

    assert result.code == 0, result.stderr
    assert f"{queue_id}: action=delete" in result.stderr and f"{queue_id}: action=release" not in result.stderr
    assert queue_id not in queue_state(pf)  # postqueue -j: gone, not deferred for Postfix to send again
    assert [m.header("Subject") for m in relays[0].wait_for(1)] == [b"copied, then the kill"]
    assert smtp_sink.messages == []
