"""The Debian package (``make deb``): built, checked with lintian, installed on this machine, removed and purged.

As root and for real: ``apt-get install ./qrunner_*.deb`` on this host, with its
``/etc/qrunner/qrunner.toml`` pointed at the tests' private Postfix instance
(the file is there before the package, as a ``make install`` would leave it, so
the package's take-over of files no package owns is exercised too). Every
expectation comes from outside qrunner: dpkg's database (``dpkg -L``,
``dpkg-query``), ``man -w``, ``getent``, the filesystem, and ``postqueue -j``
for the hold and its release. One hold is carried through a cron line that
stops the removal, a removal refused while Postfix is gated, an upgrade (the
same package as a later version) with the gate out, and the removal that
releases it; then the purge. The test refuses to run on a host where qrunner
is installed (by ``make install`` or the package) and leaves the host as it
found it, the ``_qrunner`` system user apart (Debian does not remove system
users).

``make deb`` is run once per test session (about 35 s on an idle machine),
unless ``QRUNNER_DEB`` names a package a ``make deb`` of the same run built;
the rest takes about 20 s idle (1 to 2 minutes on a loaded 2-core machine).
"""

from __future__ import annotations

import glob
import io
import os
import pwd
import re
import subprocess
import tarfile
import textwrap

import pytest

from mta_available import skip_or_fail
from mta_harness import HELD, WAITING, PostfixHarness
from qrunner_e2e import SKIP_ALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A qrunner already on this host, by make install (tests/test_uninstall.py's list) or by the package.
REAL_INSTALL = ("/usr/local/bin/qrunner", "/opt/qrunner", "/etc/qrunner", "/etc/systemd/system/qrunner.service",
                "/etc/systemd/system/qrunner.timer", "/usr/local/share/doc/qrunner", "/etc/cron.d/qrunner",
                "/usr/local/share/man/man8/qrunner.8", "/usr/bin/qrunner", "/usr/lib/qrunner", "/var/lib/qrunner")


def status(package: str = "qrunner") -> str:
    """dpkg's status of the package: "install ok installed", "deinstall ok config-files", or "" when unknown."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else ""


def apt(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRUNNER_")}
    # The maintainer scripts' qrunner must not write into this host's mail log either (tests/conftest.py).
    env.update(DEBIAN_FRONTEND="noninteractive", QRUNNER_TEST_NO_SYSTEM_LOG="1", **extra_env)
    return subprocess.run(["apt-get", "-y", "-q", *args], env=env, capture_output=True, text=True, timeout=600)


def qrunner(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRUNNER_")}
    env["QRUNNER_TEST_NO_SYSTEM_LOG"] = "1"
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return subprocess.run(["qrunner", *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def deb() -> str:
    """The package file: QRUNNER_DEB, or what ``make deb`` builds now (once per session)."""
    if os.geteuid() != 0:
        skip_or_fail("the Debian package test builds and installs a package: it needs root")
    given = os.environ.get("QRUNNER_DEB")
    if given:
        assert os.path.isfile(given), f"QRUNNER_DEB={given} is not a file"
        return given
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")}
    built = subprocess.run(["make", "--no-print-directory", "-C", ROOT, "deb"], env=env, capture_output=True,
                           text=True, timeout=900)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    found = glob.glob(os.path.join(ROOT, "qrunner_*.deb"))
    assert len(found) == 1, found
    return found[0]


def test_lintian_reports_nothing_the_overrides_do_not_justify(deb):
    checked = subprocess.run(["lintian", "--pedantic", "--display-info", "--fail-on", "error,warning,info,pedantic",
                              deb], capture_output=True, text=True, timeout=300)
    tags = [line for line in checked.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "P:", "X:")]
    assert (checked.returncode, tags) == (0, []), checked.stdout + checked.stderr
    with open(os.path.join(ROOT, "debian", "qrunner.lintian-overrides")) as f:
        overrides = f.read().split("\n\n")[1:]
    assert all(block.startswith("# ") for block in overrides), "each override needs its reason above it"


def next_version(deb: str, tmp_path) -> str:
    """The same package as a later version (VERSION+next), for an upgrade: unpacked and built again by dpkg-deb."""
    tree = tmp_path / "next"
    subprocess.run(["dpkg-deb", "-R", deb, str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"^Version: (.*)$", r"Version: \1+next", control.read_text(), flags=re.M))
    out = str(tmp_path / "qrunner_next.deb")
    subprocess.run(["dpkg-deb", "-Zgzip", "-z1", "-b", str(tree), out], check=True, capture_output=True)
    return out


def everything_under(*tops: str) -> set:
    """Every path under ``tops`` (and the tops that exist)."""
    found = {top for top in tops if lexists(top)}
    for top in tops:
        for directory, dirs, files in os.walk(top):
            found.update(os.path.join(directory, name) for name in dirs + files)
    return found


def listed(package: str = "qrunner") -> list:
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    return [path for path in out.splitlines() if path.startswith("/") and path != "/."]


def conffiles(package: str = "qrunner") -> list:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Conffiles}", package], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def lexists(path: str) -> bool:
    return os.path.lexists(path)


def test_the_package_installs_runs_shows_its_man_pages_and_removes_without_stranding_mail(deb, postfix, smtp_sink,
                                                                                         tmp_path):
    real = [path for path in REAL_INSTALL if lexists(path)]
    if real or status():
        pytest.fail("qrunner is installed on this host (%s): the package test will not run beside it"
                    % (", ".join(real) or status()), pytrace=False)
    # Where the package or its scripts could leave something behind (units' enablement, systemd's and
    # deb-systemd-helper's state, byte code, the state directory); dpkg -L covers the package's own files.
    excluded = subprocess.run("grep -rhs '^path-exclude' /etc/dpkg/dpkg.cfg /etc/dpkg/dpkg.cfg.d/", shell=True,
                              capture_output=True, text=True).stdout.split()
    if any(rule.startswith(("/usr/share/man", "/usr/share/doc")) for rule in excluded):
        pytest.fail("dpkg on this host leaves out manual pages or documentation (path-exclude in /etc/dpkg): "
                    "the package's man pages and contrib files cannot be installed here", pytrace=False)
    tops = ("/etc/qrunner", "/etc/systemd", "/etc/cron.d", "/lib/systemd/system", "/usr/lib/qrunner",
            "/usr/share/doc", "/usr/share/man", "/var/lib/qrunner", "/var/lib/systemd")
    before = everything_under(*tops)
    contents = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], capture_output=True, check=True).stdout
    shipped = {"/" + os.path.normpath(name) for name in tarfile.open(fileobj=io.BytesIO(contents)).getnames()}
    there = {path for path in shipped if lexists(path)}  # the directories this host had already: /usr/bin, ...
    try:
        _install_run_remove_purge(deb, postfix, smtp_sink, tmp_path, before, tops, there)
    finally:
        if status():  # the test failed half way: take the package off this host, releasing nothing
            apt("purge", "qrunner", QRUNNER_REMOVE_WITHOUT_RELEASE="yes")
        for leftover in ("/etc/qrunner", "/var/lib/qrunner", "/usr/lib/qrunner"):
            subprocess.run(["rm", "-rf", leftover])


def _install_run_remove_purge(deb, postfix, smtp_sink, tmp_path, before, tops, there):
    # The admin's configuration, there before the package as make install would leave it: this host's
    # (private) Postfix, and a policy that holds everything.
    os.makedirs("/etc/qrunner")
    mine = textwrap.dedent(f"""\
        # mine: the private Postfix of the tests
        mta = "postfix"
        [postfix]
        config_directory = "{postfix.config_directory}"
        """)
    with open("/etc/qrunner/qrunner.toml", "w") as f:
        f.write(mine)

    installed = apt("install", "--no-install-recommends", os.path.abspath(deb))

    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert status() == "install ok installed"
    with open("/etc/qrunner/qrunner.toml") as f:
        assert f.read() == mine  # taken over, not overwritten: dpkg now sees it as a conffile the admin changed
    assert "kept /etc/qrunner/qrunner.toml as it was" in installed.stderr + installed.stdout
    with open("/etc/qrunner/qrunner.toml.dpkg-dist") as f, open(os.path.join(ROOT, "contrib", "qrunner.toml")) as c:
        assert f.read() == c.read()  # the package's version beside it, as dpkg names it
    files = listed()
    assert sorted(conffiles()) == ["/etc/qrunner/qrunner.toml", "/etc/qrunner/relayout.lua"]
    assert os.path.realpath("/usr/bin/qrunner").startswith("/usr/lib/qrunner/")  # the venv under /usr/lib
    assert not any(p.startswith("/opt/") for p in files)
    with open("/usr/lib/qrunner/pyvenv.cfg") as f:  # its own packages only, never Debian's python3-lupa 1.14
        assert "include-system-site-packages = false" in f.read().splitlines()
    user = pwd.getpwnam("_qrunner")  # getent: the system user the Lua worker runs as
    assert user.pw_uid < 1000 and user.pw_dir == "/nonexistent" and not lexists("/nonexistent")
    assert {"/lib/systemd/system/qrunner.service", "/lib/systemd/system/qrunner.timer"} <= set(files)
    assert not glob.glob("/etc/systemd/system/*/qrunner.*")  # installed disabled: enabled nowhere
    assert not lexists("/etc/cron.d/qrunner")  # the cron example is a document, not a running job
    with open("/usr/share/doc/qrunner/contrib/cron/qrunner") as f:
        assert "root /usr/bin/qrunner -q run" in f.read()
    with open("/lib/systemd/system/qrunner.service") as f:
        assert "ExecStart=/usr/bin/qrunner run" in f.read().splitlines()
    with open("/usr/share/doc/qrunner/README.md") as f, open(os.path.join(ROOT, "README.md")) as readme:
        assert f.read() == readme.read()  # as it is: it names make install's paths and the package's on purpose
    contrib = {os.path.relpath(os.path.join(d, n), ROOT) for d, _, names in os.walk(os.path.join(ROOT, "contrib"))
               for n in names}
    assert {"/usr/share/doc/qrunner/" + p for p in contrib} <= set(files)

    version = qrunner("--version")
    assert version.returncode == 0, version.stderr
    packaged = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "qrunner"], capture_output=True, text=True)
    assert version.stdout.splitlines()[0] == f"qrunner {packaged.stdout}"  # debian/changelog keeps up with qrunner
    assert "lupa 2." in version.stdout, version.stdout  # lupa 2.x from the venv, not Debian's python3-lupa 1.14
    with open("/etc/qrunner/relayout.lua", "w") as f:
        f.write(SKIP_ALL)  # the admin's policy: hold everything
    checked = qrunner("check")
    assert checked.returncode == 0, checked.stderr
    pages = sorted(glob.glob(os.path.join(ROOT, "man", "*.[0-9]")))
    assert os.path.join(ROOT, "man", "qrunner.8") in pages, pages
    for page in pages:
        name, section = os.path.basename(page).rsplit(".", 1)
        where = subprocess.run(["man", "-w", section, name], capture_output=True, text=True)
        assert where.stdout.strip() == f"/usr/share/man/man{section}/{name}.{section}.gz", where.stderr
    assert subprocess.run(["man", "-w", "qrunner"], capture_output=True, text=True).stdout.strip() == \
        "/usr/share/man/man8/qrunner.8.gz"

    mta = PostfixHarness(postfix, smtp_sink)
    held = mta.queue_message("held by the package's qrunner")
    run = qrunner("run")
    assert run.returncode == 0, run.stderr
    assert mta.where(held) == HELD  # postqueue -j

    # A make install beside the package shadows it: postinst says so and what to do (here: on a reconfigure).
    os.symlink("/opt/qrunner/bin/qrunner", "/usr/local/bin/qrunner")
    try:
        reconfigured = subprocess.run(["dpkg-reconfigure", "-fnoninteractive", "qrunner"], capture_output=True,
                                      text=True, env={**os.environ, "QRUNNER_TEST_NO_SYSTEM_LOG": "1"})
    finally:
        os.unlink("/usr/local/bin/qrunner")
    assert reconfigured.returncode == 0, reconfigured.stderr
    assert "a make install of qrunner is still on this host: /usr/local/bin/qrunner" in reconfigured.stderr
    assert "do not run make uninstall" in reconfigured.stderr and "rm -f /usr/local/bin/qrunner" in reconfigured.stderr

    # A cron line that still starts qrunner stops the removal (the day it names, 31 February, never comes).
    with open("/etc/cron.d/qrunner", "w") as f:
        f.write("0 0 31 2 * root /usr/bin/qrunner -q run\n")
    try:
        cron = apt("remove", "qrunner")
    finally:
        os.unlink("/etc/cron.d/qrunner")
    said = cron.stdout + cron.stderr
    assert cron.returncode != 0 and "/etc/cron.d/qrunner still starts qrunner from cron" in said, said
    assert status() == "install ok installed" and mta.where(held) == HELD

    gated = apt("remove", "qrunner")

    assert gated.returncode != 0
    out = gated.stdout + gated.stderr
    assert "the MTA is still gated for qrunner" in out and "nothing was released" in out, out
    assert status() == "install ok installed" and all(lexists(p) for p in files)  # dpkg kept it all
    assert mta.where(held) == HELD

    postfix.set(defer_transports="")  # the gate out: postconf -e, postfix reload
    upgraded = apt("install", "--no-install-recommends", next_version(deb, tmp_path))

    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert status() == "install ok installed" and "+next" in subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "qrunner"], capture_output=True, text=True).stdout
    assert mta.where(held) == HELD  # an upgrade releases nothing, gate or no gate
    with open("/etc/qrunner/qrunner.toml") as f:
        assert f.read() == mine  # the admin's conffile kept, asked nothing (the package's did not change)

    removed = apt("remove", "qrunner")

    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert mta.where(held) == WAITING  # postqueue -j: released, deferred, for Postfix to deliver
    assert status() == "deinstall ok config-files"
    kept = set(conffiles())
    assert kept == {"/etc/qrunner/qrunner.toml", "/etc/qrunner/relayout.lua"}
    assert [p for p in files if lexists(p) and not os.path.isdir(p) and p not in kept] == []
    assert all(lexists(p) for p in kept) and os.path.isdir("/var/lib/qrunner")  # the admin's files, the records
    assert not lexists("/usr/lib/qrunner")  # the venv whole, byte code compiled by postinst included
    assert "Left in place, yours to keep: /etc/qrunner" in removed.stdout + removed.stderr

    purged = apt("purge", "qrunner")

    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert status() in ("", "unknown ok not-installed")
    assert not lexists("/etc/qrunner") and not lexists("/var/lib/qrunner")
    assert [p for p in files if lexists(p) and p not in there] == []  # dpkg -L, before the removal
    assert everything_under(*tops) - before == set()  # nor any file its scripts made (the byte code, the state)
    assert "the _qrunner system user stays" in purged.stdout + purged.stderr
