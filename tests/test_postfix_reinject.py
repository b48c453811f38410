"""Re-injecting a queued Postfix message through a sender's listener (qrunner/mta/postfix_reinject.py).

The envelope, content and route it reads come from qrunner/mta/postfix_envelope.py, tested here too.

Against the real private Postfix: a second SMTP sink stands for relay B, and
the instance gets the master.cf lines of contrib/postfix/master.cf.qrunner
(a loopback smtpd with ``content_filter=qr-relay-b:[127.0.0.1]:PORT`` and an
smtp clone transport that is not gated), plus a plain loopback smtpd for
submitting test mail with SMTP-only envelope parameters. The instance's own
relay (the ``smtp_sink`` fixture, "sink A") must never see re-injected mail.
"""

from __future__ import annotations

import glob
import os
import re
import smtplib
import socket
import subprocess
import time
from typing import Dict, Iterator, List, Sequence

import pytest

import test_postfix_queuefile as built
from postfix_instance import PostfixInstance, free_loopback_port, reinjection_listener_options
from smtp_sink import SinkMessage, SmtpSink, wait_for_greeting
from qrunner.mta.postfix_envelope import (NOTIFY_DELAY, NOTIFY_FAILURE, NOTIFY_NEVER, NOTIFY_SUCCESS,
                                          PostfixRecipient, QueueFileError, iter_content, read_envelope,
                                          read_route, read_sender)
from qrunner.mta.postfix_queuefile import is_queue_id
from qrunner.mta.postfix_reinject import ReinjectError, _quote_821, _uxtext, _xtext, reinject

SENDER = "alice@qrunner-test.localdomain"
REFUSED = "refused@example.net"


# -- fixtures --------------------------------------------------------------------------------------

class Listeners:
    """The loopback ports this module added to the instance's master.cf."""

    def __init__(self, submit: int, route_b: int, refusing: int, dead_route: int, dead_relay_port: int,
                 relay_b: SmtpSink):
        self.submit = submit
        self.route_b = route_b
        self.refusing = refusing
        self.dead_route = dead_route
        self.dead_relay_port = dead_relay_port
        self.relay_b = relay_b

    @property
    def b_route(self) -> str:
        return "qr-relay-b:[127.0.0.1]:%d" % self.relay_b.port

    @property
    def dead(self) -> str:
        return "qr-relay-dead:[127.0.0.1]:%d" % self.dead_relay_port


@pytest.fixture(scope="module")
def _module_relay_b(postfix_available) -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture
def relay_b(_module_relay_b: SmtpSink) -> Iterator[SmtpSink]:
    _module_relay_b.clear()
    yield _module_relay_b
    _module_relay_b.clear()


@pytest.fixture(scope="module")
def _module_listeners(_module_postfix: PostfixInstance, _module_relay_b: SmtpSink) -> Listeners:
    instance = _module_postfix
    ports = Listeners(free_loopback_port(), free_loopback_port(), free_loopback_port(), free_loopback_port(),
                      free_loopback_port(), _module_relay_b)
    instance.add_smtpd_listener(ports.submit)
    # These test the SMTP client alone, so their copies leave at once (no HOLD): the hand-over that holds
    # and releases them is tested in tests/test_handover.py.
    no_hold = {"smtpd_data_restrictions": ""}
    instance.add_reinjection_listener(ports.route_b, "qr-relay-b", "[127.0.0.1]:%d" % _module_relay_b.port, no_hold)
    # A listener that refuses one recipient, as a misconfigured or stricter one would.
    instance.add_reinjection_listener(
        ports.refusing, "qr-relay-b", "[127.0.0.1]:%d" % _module_relay_b.port,
        {"smtpd_recipient_restrictions":
         "check_recipient_access,inline:{%s=REJECT},permit_mynetworks,reject" % REFUSED, **no_hold})
    # A route whose relay is down: the copy stays deferred, with its route recorded.
    instance.add_reinjection_listener(ports.dead_route, "qr-relay-dead", "[127.0.0.1]:%d" % ports.dead_relay_port,
                                      no_hold)
    for port in (ports.submit, ports.route_b, ports.refusing, ports.dead_route):
        _wait_listening(port)
    return ports


@pytest.fixture
def listeners(_module_listeners: Listeners, postfix: PostfixInstance, relay_b: SmtpSink) -> Listeners:
    return _module_listeners


def _wait_listening(port: int) -> None:
    """Wait until the listener greets (master opens it on reload; smtpd must start)."""
    wait_for_greeting(port)


# -- helpers ---------------------------------------------------------------------------------------

def queue_path(instance: PostfixInstance, queue_id: str) -> str:
    paths = glob.glob(os.path.join(instance.queue_directory, "*", "*", queue_id)) + glob.glob(
        os.path.join(instance.queue_directory, "*", queue_id))
    assert paths, "queue file of %s not found" % queue_id
    return paths[0]


def message(subject: str, body: str = "body line\n", extra: str = "") -> bytes:
    return ("From: %s\nTo: bob@example.net\nSubject: %s\n%s\n%s" % (SENDER, subject, extra, body)).encode()


def smtp_submit(port: int, sender: str, recipients: Dict[str, Sequence[str]], data: bytes,
                mail_options: Sequence[str] = ()) -> str:
    """Submit over SMTP to the plain test listener; return the queue id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("submitter.test")
        code, msg = client.mail(sender, list(mail_options))
        assert code == 250, msg
        for rcpt, options in recipients.items():
            code, msg = client.rcpt(rcpt, list(options))
            assert code == 250, (rcpt, msg)
        code, msg = client.data(data)
        assert code == 250, msg
    return re.search(r"queued as (\w+)", msg.decode()).group(1)


def deferred(instance: PostfixInstance, queue_id: str) -> str:
    """Wait until the gated message sits in deferred/; its queue file path."""
    instance.wait_deferred([queue_id])
    return queue_path(instance, queue_id)


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def body_and_headers_without_first_received(data: bytes) -> List[bytes]:
    """A message as the sink got it, minus the Received line the re-injection added."""
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    assert lines[0].startswith(b"Received: "), lines[:3]
    i = 1
    while lines[i][:1] in (b" ", b"\t"):
        i += 1
    return lines[i:]


def assert_only_at_b(sink_a: SmtpSink, relay_b: SmtpSink, count: int = 1) -> List[SinkMessage]:
    got = relay_b.wait_for(count)
    time.sleep(0.2)
    assert sink_a.messages == [], "re-injected mail reached the default relay"
    return got


# -- end to end ------------------------------------------------------------------------------------

def test_gated_message_goes_to_relay_b_with_envelope_intact(postfix, smtp_sink, listeners, relay_b):
    qid = postfix.submit(SENDER, ["bob@example.net", "carol@example.org"], message("route me"))
    path = deferred(postfix, qid)
    before = file_bytes(path)
    env = read_envelope(path)
    assert env.sender == SENDER and env.queue_id == qid
    assert [r.address for r in env.recipients] == ["bob@example.net", "carol@example.org"]
    assert env.done_recipients == 0 and env.content_filter == "" and env.arrival > 0
    content = list(iter_content(path))

    new_id = reinject(path, ("127.0.0.1", listeners.route_b))

    assert is_queue_id(new_id) and new_id != qid
    (got,) = assert_only_at_b(smtp_sink, relay_b)
    assert got.mail_from == SENDER
    assert sorted(got.rcpt_tos) == ["bob@example.net", "carol@example.org"]
    assert body_and_headers_without_first_received(got.data) == content
    # The new id is real: the listener's smtpd logged it, with the original's id (XFORWARD IDENT).
    log = postfix.log_text()
    assert re.search(r"smtpd\[\d+\]: %s: client=\S+, orig_queue_id=%s" % (new_id, qid), log), log[-2000:]
    assert re.search(r"%s: to=<bob@example.net>, relay=127.0.0.1\[127.0.0.1\]:%d" % (new_id, relay_b.port), log)
    # The original is untouched, still gated.
    assert file_bytes(path) == before
    assert postfix.queue_names().get(qid) == "deferred"


def test_null_sender_and_quoted_local_part(postfix, smtp_sink, listeners, relay_b):
    odd = '"odd person"@example.net'
    qid = smtp_submit(listeners.submit, "", {odd: [], "plain@example.net": []}, message("bounce-like"))
    path = deferred(postfix, qid)
    env = read_envelope(path)
    assert env.sender == "" and env.recipients[0].address == "odd person@example.net"
    reinject(path, ("127.0.0.1", listeners.route_b))
    (got,) = assert_only_at_b(smtp_sink, relay_b)
    assert got.mail_from in ("", "<>")  # aiosmtpd keeps the null sender as written
    assert sorted(got.rcpt_tos) == sorted([odd, "plain@example.net"])


def test_dsn_parameters_survive(postfix, smtp_sink, listeners, relay_b):
    recipients = {
        "a@example.net": ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;A+2Bx+3Dy@example.net"],
        "b@example.net": ["NOTIFY=FAILURE"],
        "c@example.net": ["NOTIFY=NEVER"],
        "d@example.net": [],
    }
    qid = smtp_submit(listeners.submit, SENDER, recipients, message("dsn"),
                      ["RET=FULL", "ENVID=Q+2Bx+3Dy"])
    path = deferred(postfix, qid)
    env = read_envelope(path)
    assert env.ret == 1 and env.ret_param() == "FULL" and env.envid == "Q+x=y"
    by = {r.address: r for r in env.recipients}
    # dsn_mask.h: SUCCESS 2, FAILURE 4, DELAY 8 (not DELAY 4 / FAILURE 8).
    assert by["a@example.net"].notify == NOTIFY_SUCCESS | NOTIFY_DELAY == 10
    assert by["b@example.net"].notify == NOTIFY_FAILURE == 4
    assert by["c@example.net"].notify == NOTIFY_NEVER
    assert by["d@example.net"].notify == 0
    assert by["a@example.net"].orcpt == "rfc822;A+x=y@example.net"
    assert by["d@example.net"].orcpt == "rfc822;d@example.net"  # smtpd stores one even when none was given

    reinject(path, ("127.0.0.1", listeners.route_b))
    (got,) = assert_only_at_b(smtp_sink, relay_b)
    assert "RET=FULL" in got.mail_options and "ENVID=Q+2Bx+3Dy" in got.mail_options
    assert sorted(got.rcpt_options["a@example.net"]) == ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;A+2Bx+3Dy@example.net"]
    assert sorted(got.rcpt_options["b@example.net"]) == ["NOTIFY=FAILURE", "ORCPT=rfc822;b@example.net"]
    assert sorted(got.rcpt_options["c@example.net"]) == ["NOTIFY=NEVER", "ORCPT=rfc822;c@example.net"]
    assert got.rcpt_options["d@example.net"] == ["ORCPT=rfc822;d@example.net"]


def test_sendmail_dsn_options_are_read(postfix, smtp_sink, listeners, relay_b):
    """Postfix's sendmail takes -N (NOTIFY), -R (RET) and -V (ENVID) for every recipient."""
    qid = postfix.submit(SENDER, ["bob@example.net"], message("sendmail dsn"),
                         sendmail_options=["-N", "success,delay,failure", "-R", "hdrs", "-V", "env-1"])
    path = deferred(postfix, qid)
    env = read_envelope(path)
    assert env.ret == 2 and env.envid == "env-1"
    assert env.recipients[0].notify == NOTIFY_SUCCESS | NOTIFY_DELAY | NOTIFY_FAILURE
    reinject(path, ("127.0.0.1", listeners.route_b))
    (got,) = assert_only_at_b(smtp_sink, relay_b)
    assert "RET=HDRS" in got.mail_options and "ENVID=env-1" in got.mail_options
    notify = [o for o in got.rcpt_options["bob@example.net"] if o.startswith("NOTIFY=")]
    assert notify and set(notify[0][7:].split(",")) == {"SUCCESS", "DELAY", "FAILURE"}


def test_8bitmime_and_smtputf8_survive(postfix, smtp_sink, listeners, relay_b):
    utf8_rcpt = "jos\u00e9@example.net"
    qid = smtp_submit(listeners.submit, SENDER, {utf8_rcpt: [], "ascii@example.net": []},
                      message("h\u00e9llo", "b\u00f6dy\n"), ["BODY=8BITMIME", "SMTPUTF8"])
    # Only 8-bit body, no SMTPUTF8 asked for.
    qid8 = smtp_submit(listeners.submit, SENDER, {"eight@example.net": []},
                       message("plain", "caf\u00e9\n"), ["BODY=8BITMIME"])
    path, path8 = deferred(postfix, qid), deferred(postfix, qid8)
    env, env8 = read_envelope(path), read_envelope(path8)
    assert env.eight_bit and env.smtputf8 and env.sendopts & 1
    assert env8.eight_bit and not env8.smtputf8

    reinject(path, ("127.0.0.1", listeners.route_b))
    reinject(path8, ("127.0.0.1", listeners.route_b))
    # Postfix's queue manager sorts recipients: key each message by its last one.
    got = {sorted(m.rcpt_tos)[-1]: m for m in assert_only_at_b(smtp_sink, relay_b, 2)}
    utf = got[utf8_rcpt]
    assert "BODY=8BITMIME" in utf.mail_options and "SMTPUTF8" in utf.mail_options
    assert sorted(utf.rcpt_tos) == ["ascii@example.net", utf8_rcpt]
    assert "h\u00e9llo".encode() in utf.data
    eight = got["eight@example.net"]
    assert "BODY=8BITMIME" in eight.mail_options and "SMTPUTF8" not in eight.mail_options
    assert "caf\u00e9".encode() in eight.data


def test_sendmail_utf8_header_requests_smtputf8(postfix, smtp_sink, listeners):
    """smtputf8_autodetect_classes (default: sendmail, verify) sets the request bit for sendmail mail."""
    qid = postfix.submit(SENDER, ["bob@example.net"], message("gr\u00fc\u00dfe"), sendmail_options=["-B", "8BITMIME"])
    env = read_envelope(deferred(postfix, qid))
    assert env.smtputf8 and env.eight_bit


def test_only_pending_recipients_are_reinjected(postfix, smtp_sink, listeners, relay_b):
    smtp_sink.defer_rcpt = {"later@example.net"}
    qid = postfix.submit(SENDER, ["now@example.net", "later@example.net"], message("half done"))
    deferred(postfix, qid)
    postfix.schedule(qid)
    smtp_sink.wait_for(1)
    deadline = time.monotonic() + 20
    while True:
        entry = {m["queue_id"]: m for m in postfix.queue()}.get(qid)
        if entry and entry["queue_name"] == "deferred" and len(entry["recipients"]) == 1:
            break
        assert time.monotonic() < deadline, entry
        time.sleep(0.05)
    path = queue_path(postfix, qid)
    # qmgr marked the delivered recipient done in place (its R record became a D record), as postcat shows.
    envelope = subprocess.run(["postcat", "-c", postfix.config_directory, "-eq", qid], capture_output=True,
                              text=True, check=True).stdout.splitlines()
    assert "done_recipient: now@example.net" in envelope and "recipient: later@example.net" in envelope, envelope
    env = read_envelope(path)
    assert [r.address for r in env.recipients] == ["later@example.net"] and env.done_recipients == 1
    smtp_sink.clear()

    reinject(path, ("127.0.0.1", listeners.route_b))
    (got,) = assert_only_at_b(smtp_sink, relay_b)
    assert got.rcpt_tos == ["later@example.net"]


def test_refused_recipient_leaves_nothing_queued(postfix, smtp_sink, listeners, relay_b):
    qid = postfix.submit(SENDER, ["fine@example.net", REFUSED], message("one refused"))
    path = deferred(postfix, qid)
    before = file_bytes(path)
    with pytest.raises(ReinjectError) as info:
        reinject(path, ("127.0.0.1", listeners.refusing))
    err = info.value
    assert err.step == "RCPT TO" and err.code in (550, 554) and not err.maybe_accepted
    assert REFUSED in str(err) and "Access denied" in str(err) and qid in str(err)
    assert "\n" not in str(err)
    time.sleep(0.5)
    assert file_bytes(path) == before
    assert set(postfix.queue_names()) == {qid}, "a half-accepted copy was queued"
    assert relay_b.messages == [] and smtp_sink.messages == []
    assert re.search(r"smtpd\[\d+\]: disconnect from .* rset=1 quit=1", postfix.log_text())


def test_listener_down(postfix, listeners):
    qid = postfix.submit(SENDER, ["bob@example.net"], message("nobody listens"))
    path = deferred(postfix, qid)
    before = file_bytes(path)
    with pytest.raises(ReinjectError) as info:
        reinject(path, ("127.0.0.1", free_loopback_port()))
    assert info.value.step == "connect" and "refused the connection" in str(info.value)
    assert file_bytes(path) == before


def test_silent_listener_times_out(postfix, listeners):
    qid = postfix.submit(SENDER, ["bob@example.net"], message("silence"))
    path = deferred(postfix, qid)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with pytest.raises(ReinjectError) as info:
            reinject(path, server.getsockname(), timeout=0.5)
    assert info.value.step == "connect" and "did not greet within 0.5 s" in str(info.value)


def test_routed_copy_is_recognised_and_content_survives(postfix, smtp_sink, listeners):
    """The copy's route is an L record in its envelope; long content lines (L records too) are not confused."""
    long_header = "X-Long: " + " ".join(["word%d" % i for i in range(900)])
    long_body = "y" * 5000
    qid = postfix.submit(SENDER, ["bob@example.net"],
                         message("long", long_body + "\n.leading dot\n", long_header + "\n"))
    path = deferred(postfix, qid)
    original = list(iter_content(path))
    assert long_body.encode() in original and b".leading dot" in original
    assert read_envelope(path).content_filter == "" and read_route(path) == ""

    new_id = reinject(path, ("127.0.0.1", listeners.dead_route))
    copy_path = deferred(postfix, new_id)
    assert read_envelope(copy_path).content_filter == listeners.dead
    assert read_route(copy_path) == listeners.dead
    # What postcat shows for the copy's envelope.
    r = subprocess.run(["postcat", "-c", postfix.config_directory, "-eq", new_id], stdout=subprocess.PIPE)
    assert ("content_filter: %s" % listeners.dead).encode() in r.stdout.split(b"\n")
    copied = list(iter_content(copy_path))
    assert copied[0].startswith(b"Received: from ") and copied[-len(original):] == original
    # The same lines postcat prints.
    r = subprocess.run(["postcat", "-c", postfix.config_directory, "-hbq", new_id], stdout=subprocess.PIPE)
    assert r.stdout.split(b"\n")[:-1] == copied
    assert smtp_sink.messages == []


def test_milter_headers_are_sent_and_not_added_twice(postfix, smtp_sink, listeners, relay_b):
    milter = built.HeaderMilter()
    try:
        postfix.set(non_smtpd_milters="inet:127.0.0.1:%d" % milter.port, milter_default_action="tempfail")
        qid = postfix.submit(SENDER, ["bob@example.net"], message("milter"))
        path = deferred(postfix, qid)
        lines = list(iter_content(path))
        assert b"X-Milter-Appended: appended by the test milter" in lines
        assert b"Subject: changed by the test milter" in lines
        reinject(path, ("127.0.0.1", listeners.route_b))
        (got,) = assert_only_at_b(smtp_sink, relay_b)
        assert got.data.count(b"X-Milter-Appended:") == 1
        assert body_and_headers_without_first_received(got.data) == lines
    finally:
        milter.close()


def test_not_a_queue_file_and_truncated_file(postfix, listeners, relay_b, tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"Subject: not a queue file\n\nhello\n")
    with pytest.raises(QueueFileError) as info:
        read_envelope(str(junk))
    assert isinstance(info.value, ValueError) and "not a Postfix queue file" in str(info.value)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ValueError):
        read_envelope(str(empty))

    qid = postfix.submit(SENDER, ["bob@example.net"], message("cut", "z" * 3000 + "\n"))
    data = file_bytes(deferred(postfix, qid))
    cut = tmp_path / qid
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(QueueFileError):
        read_envelope(str(cut))
    with pytest.raises(ReinjectError) as info:
        reinject(str(cut), ("127.0.0.1", listeners.route_b))
    assert info.value.step == "queue file"
    time.sleep(0.3)
    assert relay_b.messages == [] and set(postfix.queue_names()) == {qid}


def _contrib_master_cf() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "contrib", "postfix", "master.cf.qrunner")) as f:
        return f.read()


def _contrib_listener_options(text: str) -> Dict[str, str]:
    options: Dict[str, str] = {}
    inside = False
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] not in " \t":
            inside = line.split()[1] == "inet"
        elif inside and line.split()[0] == "-o":
            name, _sep, value = line.split(None, 1)[1].partition("=")
            options[name] = value
    return options


def test_contrib_master_cf_matches_the_tested_listener():
    options = _contrib_listener_options(_contrib_master_cf())
    assert options == reinjection_listener_options("relay-isp", "[smtp.isp.example]:587")


def test_contrib_master_cf_works_as_written(postfix, smtp_sink, listeners, relay_b):
    port = free_loopback_port()
    text = (_contrib_master_cf().replace("10026", str(port)).replace("relay-isp", "qr-contrib")
            .replace("[smtp.isp.example]:587", "[127.0.0.1]:%d" % relay_b.port))
    postfix.append_master_cf(text)
    _wait_listening(port)
    qid = postfix.submit(SENDER, ["bob@example.net"], message("contrib"))
    new_id = reinject(deferred(postfix, qid), ("127.0.0.1", port))
    # contrib's listener holds the copy, stamped with its route and its original's id, until it is released
    assert postfix.queue_names()[new_id] == "hold"
    envelope = subprocess.run(["postcat", "-c", postfix.config_directory, "-eq", new_id], capture_output=True,
                              text=True).stdout
    assert "content_filter: qr-contrib:[127.0.0.1]:%d" % relay_b.port in envelope
    assert "named_attribute: log_ident=%s" % qid in envelope
    time.sleep(0.3)
    assert relay_b.messages == []
    postfix.release([new_id])
    postfix.schedule(new_id)
    (got,) = assert_only_at_b(smtp_sink, relay_b)
    assert got.rcpt_tos == ["bob@example.net"]
    assert re.search(r"%s: client=\S+, orig_queue_id=%s" % (new_id, qid), postfix.log_text())


# -- without Postfix: the SMTP conversation's edges ------------------------------------------------

def test_reply_without_queue_id_is_an_error_that_may_have_queued(postfix, listeners, tmp_path):
    qid = postfix.submit(SENDER, ["bob@example.net"], message("no id"))
    path = deferred(postfix, qid)
    with SmtpSink() as fake:  # answers "250 ... accepted by the test sink": no queue id
        with pytest.raises(ReinjectError) as info:
            reinject(path, ("127.0.0.1", fake.port))
        assert info.value.step == "end of data" and info.value.maybe_accepted
        assert "named no queue id" in str(info.value)
        fake.wait_for(1)


def test_recipient_refusal_by_any_server_sends_rset(postfix, listeners):
    qid = postfix.submit(SENDER, ["ok@example.net", "no@example.net"], message("refuse"))
    path = deferred(postfix, qid)
    with SmtpSink() as fake:
        fake.reject_rcpt = {"no@example.net"}
        with pytest.raises(ReinjectError) as info:
            reinject(path, ("127.0.0.1", fake.port))
        assert info.value.step == "RCPT TO" and info.value.code == 550
        time.sleep(0.2)
        assert fake.messages == []


def test_encoders():
    assert _xtext("Q+x=y z\u00e9") == "Q+2Bx+3Dy+20z+C3+A9"
    assert _uxtext("j\u00f6+\\x") == "j\\x{F6}\\x{2B}\\x{5C}x"
    assert _quote_821("") == ""
    assert _quote_821("a.b@example.net") == "a.b@example.net"
    assert _quote_821("odd person@example.net") == '"odd person"@example.net'
    assert _quote_821('q"uote\\@x') == '"q\\"uote\\\\"@x'
    assert _quote_821(".lead@x") == '".lead"@x'
    assert PostfixRecipient("a", NOTIFY_NEVER).notify_param() == "NEVER"
    assert PostfixRecipient("a", NOTIFY_FAILURE | NOTIFY_SUCCESS).notify_param() == "SUCCESS,FAILURE"
    assert PostfixRecipient("a").notify_param() is None


# -- read_route and read_sender on queue files built record by record ---------------------------------

def routed_file(tmp_path, envelope_route: bytes = b"", extracted_route: bytes = b"", content: bytes = b"",
                name: str = "ABCDEF123") -> str:
    """A queue file whose envelope and extracted parts hold the given routes (L records)."""
    envelope = built.ENVELOPE + (built.rec("L", envelope_route) if envelope_route else b"")
    extracted = built.rec("L", extracted_route) if extracted_route else b""
    content = content or built.lines(b"Subject: x", b"", b"body")
    return built.write(tmp_path, built.queue_file(content, envelope=envelope, extracted=extracted), name)


def test_read_route_reads_the_envelope_then_the_extracted_part(tmp_path):
    assert read_route(routed_file(tmp_path)) == ""
    assert read_route(routed_file(tmp_path, b"qr-relay-b:[127.0.0.1]:2525")) == "qr-relay-b:[127.0.0.1]:2525"
    # As in qmgr, the later record wins.
    path = routed_file(tmp_path, b"relay-a:[a.example]:25", b"relay-b:[b.example]:587 ")
    assert read_route(path) == "relay-b:[b.example]:587" == read_envelope(path).content_filter


def test_read_route_never_takes_a_long_content_line_for_a_route(tmp_path):
    content = (built.rec("L", b"smtp:[evil.example]:25") + built.rec("N", b" continued")
               + built.lines(b"", b"body"))
    assert read_route(routed_file(tmp_path, content=content)) == ""


def test_read_route_of_damaged_and_missing_files(tmp_path):
    path = routed_file(tmp_path, b"relay-a:[a.example]:25", b"relay-b:[b.example]:587")
    with open(path, "rb") as f:
        data = f.read()
    cut = tmp_path / "cut"
    cut.write_bytes(data[:data.index(b"relay-b") + 3])  # inside the extracted part's route record
    assert read_route(str(cut)) == "relay-a:[a.example]:25"
    cut.write_bytes(b"Subject: not a queue file\n")
    assert read_route(str(cut)) == ""
    with pytest.raises(OSError):
        read_route(str(tmp_path / "missing"))


def test_read_sender(tmp_path):
    assert read_sender(routed_file(tmp_path)) == b"sender@example.org"
    null = built.queue_file(built.rec("N", b""), envelope=built.rec("S", b"") + built.rec("R", b"r@example.net"))
    assert read_sender(built.write(tmp_path, null, "null")) == b""
    assert read_sender(built.write(tmp_path, b"", "empty")) is None
