"""What `make install` ships for both MTAs: one set of systemd units, one cron example, one example config.

An Exim host must not get Postfix's units or a configuration that names
Postfix; the example must show every setting with its default, so that
the admin's first edit is uncommenting a line, never guessing a key.
"""

from __future__ import annotations

import configparser
import os
import re
from dataclasses import fields

from qrunner.config import Config, EximSettings, MemorySettings, PostfixSettings, load_config, tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRIB = os.path.join(ROOT, "contrib")


def unit(path: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read(path)
    return parser


def test_the_units_are_the_mta_neutral_oneshot_and_its_five_minute_timer():
    service = unit(os.path.join(CONTRIB, "systemd", "qrunner.service"))
    timer = unit(os.path.join(CONTRIB, "systemd", "qrunner.timer"))

    assert service["Unit"]["After"].split() == ["postfix.service", "exim4.service"]
    assert dict(service["Service"]) == {"Type": "oneshot", "ExecStart": "/usr/local/bin/qrunner run",
                                        "SuccessExitStatus": "75", "SyslogIdentifier": "qrunner",
                                        "SyslogFacility": "mail", "Nice": "5"}
    assert dict(timer["Timer"]) == {"OnCalendar": "*:0/5", "Persistent": "true"}
    assert dict(timer["Install"]) == {"WantedBy": "timers.target"}
    assert not os.path.exists(os.path.join(CONTRIB, "systemd", "qrunner.service.d"))
    for mta in ("postfix", "exim"):  # one set of units and one cron example, for both MTAs
        assert not [f for f in os.listdir(os.path.join(CONTRIB, mta)) if f.startswith("qrunner.")]


def test_the_cron_example_runs_qrunner_quietly_every_five_minutes_as_root():
    with open(os.path.join(CONTRIB, "cron", "qrunner")) as f:
        entries = [line.split(None, 6) for line in f if line.strip() and not line.startswith("#")]
    assert entries == [["*/5", "*", "*", "*", "*", "root", "/usr/local/bin/qrunner -q run\n"]]


def uncommented(text: str) -> str:
    """The example with every commented-out table and ``key = value`` line uncommented."""
    lines = []
    for line in text.splitlines():
        match = re.match(r"# ?(\[\[?[\w.]+\]\]?|\w+ = .*)$", line)
        lines.append(match.group(1) if match else line)
    return "\n".join(lines) + "\n"


def commented_settings(text: str) -> dict:
    """The settings the example shows commented out, before its senders, as TOML reads them uncommented."""
    return tomllib.loads(uncommented(text.split("# Senders")[0]))


def test_the_example_config_is_mta_neutral_and_shows_every_setting_with_its_default(tmp_path):
    path = os.path.join(CONTRIB, "qrunner.toml")
    with open(path) as f:
        text = f.read()

    assert load_config(path) == Config(path=path)  # as shipped: the defaults, mta = "auto"
    assert re.search(r'^mta = "auto"$', text, re.M)
    shown = commented_settings(text)
    tables = {"postfix": PostfixSettings(), "exim": EximSettings(), "memory": MemorySettings()}
    top = {f.name for f in fields(Config)} - set(tables) - {"senders", "path"}
    assert set(shown) == top | set(tables)
    for name in top:
        assert shown[name] == getattr(Config(), name), name
    for table, defaults in tables.items():
        assert set(shown[table]) == {f.name for f in fields(defaults)}, table
        for name, value in shown[table].items():
            default = getattr(defaults, name)
            assert default is None or value == default, f"[{table}] {name}"  # None: found on the host, an example
    everything = tmp_path / "uncommented.toml"
    everything.write_text(uncommented(text))  # the senders uncommented too: still a valid configuration
    assert [s.name for s in load_config(str(everything)).senders] == ["isp", "backup"]


