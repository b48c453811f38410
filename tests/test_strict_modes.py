"""Strict modes: as root, qrunner refuses a configuration or policy script that someone else could change.

The rule is sshd's StrictModes (OpenSSH's ``safe_path``): the file and
every directory on the way to it must be root's and writable by neither
group nor others, a sticky /tmp included. Each refused case ends with exit
78 and one sentence naming the file and the fix; ``strict_modes = false``
relaxes it for the script (never for the configuration file, which would
then relax its own check). The files live under tmp_path, which the test
setup keeps under a root-owned 0755 directory (tests/safe_tmp.py), so the
accepted case is accepted without any relaxing.
"""

from __future__ import annotations

import os
import shutil

import pytest

from memory_harness import MemoryHarness
from policy_helpers import no_default_config, record, run_cli, write_config, write_script  # noqa: F401
from policy_helpers import write_snapshot
from qrunner_e2e import Qrunner

pytestmark = pytest.mark.usefixtures("no_default_config")

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="strict modes apply to root only (CI runs as root)")

SEND = "function CheckFile(f, a) return a end\n"
NOBODY = 65534


def _check(capsys, config, *args):
    return run_cli(capsys, ["--config", config, "check", *args])


@pytest.fixture
def files(tmp_path):
    """A safe configuration (no settings) and a safe script; and a subdirectory to make unsafe."""
    config = write_config(tmp_path, "")
    script = write_script(tmp_path, SEND)
    return config, script


@as_root
def test_a_safe_configuration_and_script_are_accepted(capsys, files):
    config, script = files
    code, out, err = _check(capsys, config, "--script", script)
    assert (code, err) == (0, "")
    assert out == f"{script}: loads without errors (Lua 5.4; senders 0:default)\n"


@as_root
@pytest.mark.parametrize("mode, who, fix", [(0o664, "group", "chmod g-w"), (0o646, "others", "chmod o-w"),
                                            (0o666, "group and others", "chmod go-w")])
def test_a_script_others_may_write_is_refused(capsys, files, mode, who, fix):
    config, script = files
    os.chmod(script, mode)
    code, out, err = _check(capsys, config, "--script", script)
    assert (code, out) == (78, "")
    assert err == (f"qrunner: {script}: the policy script is not safe to use as root: the file is writable by {who} "
                   f"(mode {mode:04o}), so someone other than root could change what qrunner does; run "
                   f"'{fix} {script}' (or set strict_modes = false in qrunner.toml).\n")


@as_root
def test_a_script_owned_by_another_user_is_refused(capsys, files):
    config, script = files
    os.chown(script, NOBODY, -1)
    code, out, err = _check(capsys, config, "--script", script)
    assert (code, out) == (78, "")
    assert f"{script}: the policy script is not safe to use as root: the file is owned by " in err
    assert f", not root, so someone other than root could change what qrunner does; run 'chown root {script}'" in err


@as_root
def test_a_directory_above_the_script_that_others_may_write_is_refused(capsys, files, tmp_path):
    config, _ = files
    open_dir = tmp_path / "drop"
    open_dir.mkdir()
    script = write_script(open_dir, SEND)
    os.chmod(open_dir, 0o757)
    code, out, err = _check(capsys, config, "--script", script)
    assert (code, out) == (78, "")
    assert (f"the directory {open_dir} above it is writable by others (mode 0757), so someone other than root could "
            f"change what qrunner does; run 'chmod o-w {open_dir}'") in err


@as_root
def test_a_script_under_sticky_tmp_is_refused_as_sshd_refuses_it(capsys, files):
    config, _ = files
    directory = os.path.join("/tmp", f"qrunner-strict-{os.getpid()}")
    os.makedirs(directory, mode=0o755)
    try:
        script = write_script(directory, SEND)
        code, out, err = _check(capsys, config, "--script", script)
    finally:
        shutil.rmtree(directory)
    assert (code, out) == (78, "")
    assert ("the directory /tmp above it is writable by group and others (mode 1777, sticky), so someone other than "
            "root could change what qrunner does; move it to a directory only root may change, like /etc/qrunner") in err


@as_root
def test_a_symlink_to_a_script_that_fails_is_refused(capsys, files, tmp_path):
    config, script = files
    os.chmod(script, 0o664)
    link = tmp_path / "link.lua"
    link.symlink_to(script)
    code, out, err = _check(capsys, config, "--script", link)
    assert (code, out) == (78, "")
    assert f"qrunner: {link}: the policy script is not safe to use as root: the file is writable by group" in err


@as_root
def test_a_symlink_in_a_directory_others_may_write_is_refused_though_its_target_is_safe(capsys, files, tmp_path):
    """Stricter than sshd, which judges the resolved path only: whoever may write the link's directory may repoint it."""
    config, script = files
    open_dir = tmp_path / "links"
    open_dir.mkdir()
    (open_dir / "relayout.lua").symlink_to(script)
    os.chmod(open_dir, 0o777)
    code, out, err = _check(capsys, config, "--script", open_dir / "relayout.lua")
    assert (code, out) == (78, "")
    assert f"the directory {open_dir} above it is writable by group and others (mode 0777)" in err


@as_root
def test_strict_modes_false_lets_such_a_script_run(capsys, files, tmp_path):
    _, script = files
    os.chmod(script, 0o666)
    config = write_config(tmp_path, "strict_modes = false\n", "relaxed.toml")
    code, out, err = _check(capsys, config, "--script", script)
    assert (code, err) == (0, "")
    assert "loads without errors" in out


@as_root
@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_a_configuration_file_others_may_write_is_refused_and_cannot_relax_itself(capsys, files, tmp_path, mode):
    _, script = files
    config = write_config(tmp_path, "strict_modes = false\n", "relaxed.toml")
    os.chmod(config, mode)
    code, out, err = _check(capsys, config, "--script", script)
    assert (code, out) == (78, "")
    assert err.startswith(f"qrunner: {config}: the configuration file is not safe to use as root: the file is "
                          "writable by ")
    assert "strict_modes" not in err  # no setting can relax it


@as_root
def test_a_configuration_file_owned_by_another_user_is_refused_by_every_command(capsys, files):
    config, _ = files
    os.chown(config, NOBODY, -1)
    for command in (["status"], ["plan"], ["run", "--dry-run"], ["release", "--all"], ["snapshot"]):
        code, out, err = run_cli(capsys, ["--config", config, *command])
        assert (code, out) == (78, ""), command
        assert err.startswith(f"qrunner: {config}: the configuration file is not safe to use as root: the file is "
                              "owned by "), command


@as_root
def test_plan_of_a_snapshot_refuses_an_unsafe_script_too(capsys, files, tmp_path):
    config, script = files
    os.chmod(script, 0o646)
    snapshot = write_snapshot(tmp_path, [record("Q1")])
    code, out, err = run_cli(capsys, ["--config", config, "plan", "--queue-file", snapshot, "--script", script])
    assert (code, out) == (78, "")
    assert f"{script}: the policy script is not safe to use as root" in err


@as_root
def test_run_refuses_an_unsafe_script_before_it_touches_the_queue(tmp_path):
    """The timer's command: exit 78, the message still waiting in the memory MTA's own queue file."""
    memory = MemoryHarness(str(tmp_path / "memory-queue"))
    queue_id = memory.queue_message("waits")
    qr = Qrunner(tmp_path, memory, "function CheckFile(f, a) a.SkipSend = 1 return a end\n")
    os.chmod(qr.script_path, 0o664)
    result = qr("run")
    assert result.code == 78
    assert f"{qr.script_path}: the policy script is not safe to use as root: the file is writable by group" \
        in result.stderr
    assert memory.snapshot() == {queue_id: ("waiting", ("bob@example.net",))}


def test_not_as_root_nothing_is_checked(capsys, tmp_path, monkeypatch):
    """Another user's qrunner runs with that user's rights: a script in a world-writable directory loads.

    Run for real by a normal user; as root (CI), as the same process with another effective uid, since the
    interpreter of a test venv may live where other users cannot run it.
    """
    if os.geteuid() == 0:
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    script = write_script(open_dir, SEND)
    os.chmod(script, 0o666)
    config = write_config(open_dir, "")
    os.chmod(config, 0o666)
    code, out, err = _check(capsys, config, "--script", script)
    assert (code, err) == (0, "")
    assert out == f"{script}: loads without errors (Lua 5.4; senders 0:default)\n"
