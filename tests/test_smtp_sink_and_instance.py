"""Smoke tests of the test helpers: the SMTP sink and the private Postfix.

If these fail, every end-to-end test built on them fails too; these say why.
"""

from __future__ import annotations

import smtplib
import time

from smtp_sink import SmtpSink

# The fixtures postfix and smtp_sink come from tests/postfix_fixtures.py,
# loaded by tests/conftest.py.


def test_sink_records_dsn_parameters_and_refuses():
    with SmtpSink() as sink:
        sink.reject_rcpt = {"no@example.net"}
        with smtplib.SMTP("127.0.0.1", sink.port) as client:
            client.ehlo("client.test")
            assert client.has_extn("dsn") and client.has_extn("smtputf8")
            client.mail("s@example.org", ["RET=HDRS", "ENVID=Abc+2B1"])
            assert client.rcpt("a@example.net", ["NOTIFY=SUCCESS,FAILURE",
                                                 "ORCPT=rfc822;A@example.net"])[0] == 250
            assert client.rcpt("no@example.net")[0] == 550
            assert client.data(b"Subject: t\r\n\r\nbody\r\n")[0] == 250
        (msg,) = sink.wait_for(1, timeout=5)
        assert msg.seq == 1 and msg.mail_from == "s@example.org"
        assert msg.rcpt_tos == ["a@example.net"]
        assert msg.mail_options == ["RET=HDRS", "ENVID=Abc+2B1"]
        assert msg.rcpt_options == {"a@example.net": ["NOTIFY=SUCCESS,FAILURE",
                                                      "ORCPT=rfc822;A@example.net"]}
        assert msg.header("subject") == b"t"
        try:
            sink.wait_for(2, timeout=0.1)
        except AssertionError as exc:
            assert "expected 2 message(s)" in str(exc) and "s@example.org" in str(exc)
        else:
            raise AssertionError("wait_for did not time out")


def test_gate_holds_mail_until_scheduled(postfix, smtp_sink):
    qid = postfix.submit("s@example.org", ["r@example.net"],
                         b"Subject: gated\n\n8-bit body \xc3\xa9\n")
    (entry,) = postfix.wait_deferred([qid])
    assert entry["recipients"][0]["delay_reason"] == "deferred transport"
    assert smtp_sink.messages == []
    postfix.hold([qid])
    postfix.wait_for_queue([qid], "hold")
    postfix.release([qid])
    postfix.wait_deferred([qid])
    postfix.schedule(qid)
    (msg,) = smtp_sink.wait_for(1)
    assert msg.mail_from == "s@example.org" and msg.rcpt_tos == ["r@example.net"]
    assert msg.header("Subject") == b"gated"
    assert msg.rcpt_options["r@example.net"] == ["ORCPT=rfc822;r@example.net"]
    postfix.wait_gone([qid])


def test_refused_recipient_bounces(postfix, smtp_sink):
    smtp_sink.reject_rcpt = {"bad@example.net"}
    qid = postfix.submit("s@example.org", ["bad@example.net"], b"Subject: bounce me\n\nx\n")
    postfix.wait_deferred([qid])
    postfix.schedule(qid)
    postfix.wait_gone([qid])
    assert "bad@example.net" in postfix.log_text() and "status=bounced" in postfix.log_text()
    # The bounce goes to the sender's domain, i.e. the gate holds it too.
    deadline = time.monotonic() + 20
    while True:
        # showq (postqueue -j) prints the null sender as empty_address_recipient.
        bounces = [m for m in postfix.queue()
                   if m["sender"] == "MAILER-DAEMON" and m["queue_name"] == "deferred"]
        if bounces or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert bounces and bounces[0]["recipients"][0]["address"] == "s@example.org"
