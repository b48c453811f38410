"""No secret is ever shown: a setting whose name says it is one (password, secret, token...) never reaches output.

There is no such setting yet (a future SMTP password of a re-injection
route, say); these show that the configuration's error messages, and
whatever prints a secret setting's value later, cannot show it.
"""

from __future__ import annotations

import json
import logging

import pytest

import qrunner.config
from qrunner.settings import Kind
from policy_helpers import no_default_config, run_cli, write_config, write_script  # noqa: F401
from qrunner.config import HIDDEN, Secret, is_secret

pytestmark = pytest.mark.usefixtures("no_default_config")

VALUE = "hunter2-do-not-print"


@pytest.mark.parametrize("text, key", [
    (f'smtp_password = "{VALUE}"\n', "smtp_password"),
    (f'[exim]\napi_token = "{VALUE}"\n', "exim.api_token"),
    (f'[postfix]\nsecret = "{VALUE}"\n', "postfix.secret"),
    (f'[[sender]]\nid = 0\nname = "isp"\n[sender.postfix]\npassword = "{VALUE}"\n', "sender #1.postfix.password"),
])
@pytest.mark.parametrize("command", [["check"], ["status"], ["plan"]])
def test_an_unknown_secret_setting_is_named_never_shown(capsys, tmp_path, text, key, command):
    config = write_config(tmp_path, text)
    script = write_script(tmp_path, "function CheckFile(f, a) return a end\n")
    code, out, err = run_cli(capsys, ["--config", config, *command] + (["--script", script] if command == ["check"]
                                                                          else []))
    assert code == 78
    assert f"setting '{key}'" in err
    assert VALUE not in out + err


@pytest.mark.parametrize("table, text", [("_TOP_LEVEL", "relay_password = 12345\n"),
                                          ("_EXIM_KEYS", "[exim]\nrelay_password = 12345\n")])
def test_a_secret_setting_of_the_wrong_type_is_not_quoted(capsys, tmp_path, monkeypatch, table, text):
    """A setting added later whose name says it is secret: its type error says what it must be, not what it is."""
    keys = dict(getattr(qrunner.config, table))
    keys["relay_password"] = Kind("a string", lambda v: isinstance(v, str))
    monkeypatch.setattr(qrunner.config, table, keys)
    config = write_config(tmp_path, text)
    code, out, err = run_cli(capsys, ["--config", config, "status"])
    assert code == 78
    assert f"setting '{'exim.' if table == '_EXIM_KEYS' else ''}relay_password' must be a string, not {HIDDEN}" in err
    assert "12345" not in err


def test_a_secret_value_prints_as_hidden_wherever_it_goes(caplog):
    secret = Secret(VALUE)
    logging.getLogger("qrunner").warning("route %s, %r", secret, secret)
    shown = [str(secret), repr(secret), f"{secret}", f"{secret!r:>20}", "%s" % secret, caplog.text,
             str({"password": secret}), str([secret])]
    assert all(VALUE not in text for text in shown)
    assert HIDDEN in caplog.text
    with pytest.raises(TypeError):
        json.dumps({"password": secret})  # refused, never written
    assert secret.reveal() == VALUE


@pytest.mark.parametrize("key, secret", [("smtp_password", True), ("sender.postfix.passwd", True),
                                         ("api_token", True), ("client_secret", True), ("credentials", True),
                                         ("script", False), ("state_dir", False), ("max_per_run", False)])
def test_which_names_are_secret(key, secret):
    assert is_secret(key) is secret
