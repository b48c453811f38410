"""The Lua worker runs the admin's script as ``script_user`` (default ``_qrunner``), with no privilege left.

README "What the policy script can do": as root, qrunner starts the worker,
which loads Python, qrunner and Lua, then drops to the script user (no
supplementary group, no capability, no_new_privs) before the script's first
line runs. The parent reads the headers the script asks for, a batch at a
time. Shown here over the real Postfix and Exim of the test setup: the
worker's credentials as the kernel reports them (/proc/PID/status, read from
outside while the script runs), what Python code run inside the live worker
(by the test-only fault harness) gets on the state directory, the MTA's queue
and /etc (EACCES), and that headers read
through the parent are those the MTA's own tools print.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import pytest

from mta_harness import harness_for
from fault_harness import FaultyQrunner
from qrunner_e2e import Qrunner

SCRIPT_USER = "_qrunner"

# Reports every header field the script sees, hex-encoded, joined by "-" (nothing in a reason needs escaping).
HEADERS_TO_REASON = r"""
local function hex(s) return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end)) end
function CheckFile(f, a, size, c, r, rc, HeaderData, HeaderLines)
  local fields = {}
  for i = 1, #HeaderLines do fields[i] = hex(HeaderLines[i]) end
  a.SkipSend = true
  a.Reason = "fields:" .. table.concat(fields, "-") .. " subject:" .. hex(HeaderData.subject or "")
  return a
end
"""


@pytest.fixture(params=["postfix", "exim"])
def mta(request, tmp_path):
    return harness_for(request, tmp_path)


@pytest.fixture
def open_dir():
    """A root-owned 0755 directory outside pytest's private tmp_path, so that only qrunner's own modes guard it."""
    path = tempfile.mkdtemp(prefix="qr-sandbox-", dir="/var/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def qrunner_with(tmp_path, mta, script: str, **settings) -> Qrunner:
    """The qrunner command with these top-level settings replacing the harness's (TOML has one value per key)."""
    qrunner = Qrunner(tmp_path, mta, script=script)
    lines = [line for line in qrunner.config_path.read_text().splitlines(True)
             if line.partition(" =")[0] not in settings]
    qrunner.config_path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()) + "".join(lines))
    return qrunner


def script_uid_gid():
    entry = pwd.getpwnam(SCRIPT_USER)
    return entry.pw_uid, entry.pw_gid


def _children(pid: int):
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    fields = handle.read().rpartition(")")[2].split()
                if int(fields[1]) == pid:
                    yield int(name)
            except OSError:
                pass


def _status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as handle:
        return dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def test_the_script_runs_as_the_script_user_with_no_privilege_left(tmp_path, mta):
    """Read from outside, by the kernel's account: uid, gid, groups, capabilities, no_new_privs of the worker."""
    mta.queue_message("one")
    # The worker is looked at once its CheckFile runs: killed while it still loads (the top level's line can reach
    # the log before the worker says it loaded), the plan would stop at the load instead (78, nothing decided).
    script = 'print("script top level runs")\nfunction CheckFile(f, a) print("CheckFile runs") while true do end end\n'
    qrunner = qrunner_with(tmp_path, mta, script, script_timeout=60)
    proc = qrunner.start("-v", "plan")
    seen = []
    killer = threading.Timer(120, proc.kill)  # hang guard only
    killer.start()
    try:
        for line in proc.stderr:
            seen.append(line)
            if "CheckFile runs" in line:
                break
        assert any("script top level runs" in line for line in seen), "".join(seen)
        [worker] = [p for p in _children(proc.pid) if b"qrunner.policy_worker" in _cmdline(p)]
        status = _status(worker)
        os.kill(worker, signal.SIGKILL)  # it would spin until script_timeout; the pass goes on without it
        out, err = proc.communicate(timeout=60)
    finally:
        killer.cancel()
    uid, gid = script_uid_gid()
    assert status["Uid"].split() == [str(uid)] * 4  # real, effective, saved, filesystem
    assert status["Gid"].split() == [str(gid)] * 4
    assert status["Groups"].split() == []
    for field in ("CapPrm", "CapEff", "CapAmb", "CapInh"):
        assert int(status[field], 16) == 0, (field, status[field])
    assert status["NoNewPrivs"].strip() == "1"
    assert "Traceback" not in err and "policy error" in out + err


def in_the_worker(tmp_path, mta, state_dir, attempts):
    """What each (what, path) attempt gives Python code run inside the live Lua worker of a real ``qrunner plan``.

    The fault harness (tests/faults/sitecustomize.py, test-only) runs the attempts in the worker's own
    process when it first waits for a request, after it has dropped to the script user: what code that
    escaped the Lua sandbox into the worker could do.
    """
    marks = tempfile.mkdtemp(prefix="qrunner-worker-probe-")
    os.chmod(marks, 0o777)  # the worker, as _qrunner, writes its findings here
    out = os.path.join(marks, "probe.json")
    try:
        (tmp_path / "probe").mkdir()
        qrunner = FaultyQrunner(tmp_path / "probe", mta, script="function CheckFile(f, a) return a end")
        lines = [line for line in qrunner.config_path.read_text().splitlines(True)
                 if line.partition(" =")[0] != "state_dir"]
        qrunner.config_path.write_text(f"state_dir = {json.dumps(state_dir)}\n" + "".join(lines))
        result = qrunner.faulted([{"target": "qrunner.wire:Connection.recv", "do": "probe",
                                   "caller_file": "*/qrunner/policy_worker.py", "attempts": attempts, "out": out,
                                   "once": os.path.join(marks, "struck")}], "plan")
        assert result.code == 0 and "Traceback" not in result.stderr, result.stderr
        with open(out) as handle:
            found = json.load(handle)
    finally:
        shutil.rmtree(marks)
    assert found["uid"] == script_uid_gid()[0], found  # it ran in the worker, after the drop
    return found["results"]


def queue_file(mta, queue_id: str) -> str:
    if mta.name == "postfix":
        return mta.filename(queue_id)
    return mta.instance.header_path(queue_id)


def guarded_queue_dir(mta) -> str:
    """The MTA's own directory that keeps others out: Postfix's deferred (0700), Exim's spool (0750)."""
    if mta.name == "postfix":
        return os.path.join(mta.instance.queue_directory, "deferred")
    return mta.instance.spool_directory


def test_code_in_the_worker_gets_eacces_on_the_state_dir_the_queue_and_etc(tmp_path, mta, open_dir):
    state_dir = os.path.join(open_dir, "state")
    qrunner = qrunner_with(tmp_path, mta, "function CheckFile(f, a) return a end", state_dir=state_dir)
    assert qrunner("run").code == 0  # makes the state directory and database
    database = os.path.join(state_dir, "qrunner.sqlite")
    assert os.path.exists(database)
    path = queue_file(mta, mta.queue_message("private mail"))
    guarded = guarded_queue_dir(mta)
    etc_file = "/etc/qrunner-sandbox-probe"
    got = in_the_worker(tmp_path, mta, state_dir, [
        ("stat", state_dir), ("list", state_dir), ("write", database), ("create", state_dir + "/x"),
        ("stat", guarded), ("list", guarded), ("read", path), ("rename", path),
        ("create", etc_file), ("write", "/etc/passwd"), ("rename", "/etc/hostname"),
    ])
    assert got == ["ok", "EACCES", "EACCES", "EACCES",
                   "ok", "EACCES", "EACCES", "EACCES",
                   "EACCES", "EACCES", "EACCES"]
    assert not os.path.exists(etc_file)


def mta_headers(mta, queue_id: str):
    """The header fields as the MTA's own tool prints them: ``postcat -h`` or ``exim -Mvh``."""
    if mta.name == "exim":
        return mta.instance.headers_mvh(queue_id)
    out = subprocess.run(["postcat", "-h", mta.filename(queue_id)], stdout=subprocess.PIPE, check=True).stdout
    fields = []
    for line in out.split(b"\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\n" + line
        else:
            fields.append(line)
    return fields


def test_headers_served_by_qrunner_are_what_the_mtas_tool_prints(tmp_path, mta):
    """Every message's HeaderLines and HeaderData, read by the parent in batches, as postcat -h / exim -Mvh give them."""
    ids = []
    for n in range(12):
        message = (f"From: alice@qrunner-test.localdomain\nTo: bob@example.net\nSubject: number {n}\n"
                   f"X-Folded: first part\n second part\nX-N: {n}\n\n" + "body line\n" * (20 * n)).encode()
        if mta.name == "postfix":
            queue_id = mta.instance.submit("alice@qrunner-test.localdomain", ["bob@example.net"], message)
            mta.instance.wait_deferred([queue_id])
        else:
            queue_id = mta.instance.submit("alice@qrunner-test.localdomain", ["bob@example.net"], message)
            mta.instance.wait_queued([queue_id])
        ids.append(queue_id)
    qrunner = Qrunner(tmp_path, mta, script=HEADERS_TO_REASON)
    result = qrunner("plan", "--format", "json")
    assert result.code == 0, result.stderr
    reasons = {d["queue_id"]: d["reason"] for d in json.loads(result.stdout)["decisions"]}
    for n, queue_id in enumerate(ids):
        fields = mta_headers(mta, queue_id)
        subject = f"number {n}".encode()
        assert reasons[queue_id] == "fields:" + "-".join(f.hex() for f in fields) + " subject:" + subject.hex()
        assert b"X-Folded: first part\n second part" in fields


def test_a_missing_script_user_is_a_config_error_naming_the_fix(tmp_path, mta):
    mta.queue_message("one")
    before = mta.snapshot()
    qrunner = qrunner_with(tmp_path, mta, "function CheckFile(f, a) return a end", script_user="qrunner-no-such-user")
    result = qrunner("run")
    assert result.code == 78
    assert "script_user 'qrunner-no-such-user' does not exist" in result.stderr
    assert "adduser --system" in result.stderr and 'script_user = "root"' in result.stderr
    assert "Traceback" not in result.stderr
    assert mta.snapshot() == before


def test_script_user_root_keeps_the_script_running_as_root(tmp_path, mta):
    """The admin's knowing choice: the worker stays root (and still gets no_new_privs)."""
    mta.queue_message("one")
    script = 'print("script top level runs")\nfunction CheckFile(f, a) while true do end end\n'
    qrunner = qrunner_with(tmp_path, mta, script, script_timeout=60, script_user="root")
    proc = qrunner.start("-v", "plan")
    killer = threading.Timer(120, proc.kill)
    killer.start()
    try:
        for line in proc.stderr:
            if "script top level runs" in line:
                break
        [worker] = [p for p in _children(proc.pid) if b"qrunner.policy_worker" in _cmdline(p)]
        status = _status(worker)
        os.kill(worker, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        killer.cancel()
    assert status["Uid"].split() == ["0"] * 4
    assert status["NoNewPrivs"].strip() == "1"



@pytest.mark.parametrize("where", ["memory"])
def test_a_qrunner_package_in_the_working_directory_is_never_imported(tmp_path, request, where):
    """Started from a directory anyone could write to, holding a ``qrunner`` package: the worker imports its own.

    The installed command (the console script, as an admin types it) is run from that directory; a worker started
    with ``python -m`` there would import the planted package first, as root, before it drops to script_user.
    """
    mta = harness_for(request, tmp_path, where)
    mta.queue_message("one")
    planted = tmp_path / "cwd"
    (planted / "qrunner").mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    (planted / "qrunner" / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write('ran')\n")
    qrunner = qrunner_with(tmp_path, mta, 'function CheckFile(f, a) a.SkipSend = true a.Reason = "looked" return a end')
    command = os.path.join(os.path.dirname(sys.executable), "qrunner")
    result = subprocess.run([command, "plan"], cwd=planted, env=qrunner._env(), capture_output=True, text=True,
                            timeout=120)
    assert not marker.exists(), result.stderr
    assert result.returncode == 0, result.stderr
    assert "looked" in result.stdout


def test_a_worker_that_cannot_drop_its_privileges_runs_no_script(tmp_path):
    """Root without CAP_SETUID/CAP_SETGID (a container, a unit's bounding set): exit 78, nothing decided, no fallback to root."""
    snapshot = tmp_path / "queue.jsonl"
    snapshot.write_text(json.dumps({"queue_id": "A1", "arrival_time": 1, "message_size": 5, "sender": "a@b",
                                    "recipients": [{"address": "c@d"}], "headers": ["Subject: hi"]}) + "\n")
    script = tmp_path / "relayout.lua"
    script.write_text("function CheckFile(f, a) return a end\n")
    config = tmp_path / "qrunner.toml"
    config.write_text(f'state_dir = "{tmp_path}/state"\n')
    env = dict(os.environ, QRUNNER_CONFIG=str(config),
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(["setpriv", "--bounding-set", "-setuid,-setgid", sys.executable, "-m", "qrunner",
                             "plan", "--queue-file", str(snapshot), "--script", str(script)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 78
    assert "could not drop its privileges" in result.stderr and "nothing was decided" in result.stderr
    assert "A1" not in result.stdout and "Traceback" not in result.stderr


class _RunsCode:
    """A pickle that runs a shell command when unpickled, as a taken-over worker might send one."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_parent_never_runs_code_a_taken_over_worker_sends(tmp_path):
    """What comes back from the unprivileged worker is read as plain data only: no pickled call reaches root."""
    import pickle
    from multiprocessing import Pipe

    from qrunner.policy import _Worker

    marker = tmp_path / "ran-as-root"
    parent, child = Pipe()
    child.send_bytes(pickle.dumps(("results", [(0, "ok", _RunsCode(str(marker)))])))
    child.send_bytes(pickle.dumps(("done", "")))
    worker = _Worker.__new__(_Worker)  # only its connection, no process
    worker.conn = parent
    with pytest.raises(OSError, match="unreadable message from the Lua worker"):
        worker.receive()
    assert worker.receive() == ("done", "")
    assert not marker.exists()


# What a worker taken over by its script could send its root parent instead of its answer: plain data (nothing
# else is read, above), but of the wrong shape.
MALFORMED = {
    "a result for a message it was not given": ["results", [[99, ["x"]]]],
    "a result of the wrong shape": ["results", [[0]]],
    "a print for a message it was not given": ["print", "hello", 99],
    "an answer that is not a message": 5,
}


@pytest.mark.reliability
@pytest.mark.parametrize("what", list(MALFORMED))
def test_a_taken_over_worker_sending_data_of_the_wrong_shape_is_a_dead_worker_not_a_traceback(tmp_path, figures,
                                                                                            what):
    from memory_harness import MemoryHarness
    from qrunner_e2e import make_message

    mta = MemoryHarness(str(tmp_path / "queue"))
    ids = [mta.queue.submit("alice@qrunner-test.localdomain", ["bob@example.net"], make_message(subject))
           for subject in ("one", "two")]
    marks = tempfile.mkdtemp(prefix="qrunner-worker-mark-")
    os.chmod(marks, 0o777)  # the worker, as _qrunner, leaves its "struck once" mark here
    try:
        qrunner = FaultyQrunner(tmp_path, mta, "function CheckFile(f, a) a.Priority = 60 return a end")
        result = qrunner.faulted([{"target": "qrunner.wire:Connection.send", "call": 2, "do": "replace",
                                   "caller_file": "*/qrunner/policy_worker.py", "value": MALFORMED[what],
                                   "once": os.path.join(marks, "struck")}], "plan", "--format", "json")
        struck = os.path.exists(os.path.join(marks, "struck"))
    finally:
        shutil.rmtree(marks)

    assert struck, result.stderr
    ok = result.code in (0, 1) and "Traceback" not in result.stderr
    figures.record("inputs", "a taken-over Lua worker sending data of the wrong shape", tried=1, survived=int(ok))
    assert ok, f"exit {result.code}:\n{result.stderr}"
    assert "the Lua worker sent a message qrunner cannot read" in result.stderr, result.stderr
    planned = {row["queue_id"]: row for row in json.loads(result.stdout)["decisions"]}
    assert set(planned) == set(ids), result.stdout  # every message still planned: decided again, or held
