#!/bin/bash
# Make the two system loggers the log tests run (tests/log_daemons.py)
# available, without starting or enabling either on this host:
#
# - rsyslog: Debian's package unpacked into a private prefix
#   ($QRUNNER_TEST_RSYSLOG_PREFIX, default /opt/qrunner-test-rsyslog) with
#   apt-get download and dpkg -x, plus the shared libraries rsyslogd needs.
#   Not "apt-get install rsyslog": that would run its postinst, which enables
#   and starts rsyslog.service on a systemd host (a new /var/log/mail.log and
#   /var/log/syslog fed from the journal), and the package conflicts with any
#   other system-log-daemon (syslog-ng, inetutils-syslogd), which apt would
#   remove. The tests start their own rsyslogd -n with their own config inside
#   a private mount and pid namespace.
# - systemd-journald and journalctl: Debian's systemd package. A host booted
#   with systemd has it already (nothing is installed then). Elsewhere
#   (a container, sysvinit) it is installed as a package: without systemd as
#   pid 1 its postinst starts nothing, and no running logger changes. The
#   tests start their own systemd-journald with a private /run and volatile
#   storage inside a private mount and pid namespace.
#
# Idempotent: does nothing when both already run. Run as root on Debian (make
# test, CI); anywhere else it explains why it did nothing and exits 0, and the
# log daemon tests skip (or fail, when QRUNNER_REQUIRE_MTA=1 says they must
# run). On success it prints one line.
set -u

PREFIX="${QRUNNER_TEST_RSYSLOG_PREFIX:-/opt/qrunner-test-rsyslog}"
RSYSLOGD="$PREFIX/usr/sbin/rsyslogd"
JOURNALD=/lib/systemd/systemd-journald

say() { printf '%s\n' "install-log-daemons: $*" >&2; }
die() { say "$*"; exit 1; }

if [ "$(id -u)" != 0 ]; then
    say "not running as root; not installing rsyslog or systemd-journald (the log daemon tests will skip)."
    exit 0
fi
if [ ! -r /etc/debian_version ] || ! command -v dpkg-deb >/dev/null 2>&1 \
        || ! command -v apt-get >/dev/null 2>&1; then
    say "this is not a Debian system; the test loggers come from Debian packages (the log daemon tests will skip)."
    exit 0
fi

rsyslog_works() {
    [ -x "$RSYSLOGD" ] && "$RSYSLOGD" -v >/dev/null 2>&1
}

journald_works() {
    [ -x "$JOURNALD" ] && command -v journalctl >/dev/null 2>&1 && journalctl --version >/dev/null 2>&1
}

if rsyslog_works && journald_works; then
    exit 0
fi

set -e
export DEBIAN_FRONTEND=noninteractive
work="$(mktemp -d /tmp/qrunner-log-install.XXXXXX)"
chmod 755 "$work"  # apt-get download runs as _apt and writes here
trap 'rm -rf "$work"' EXIT
apt-get update -q >"$work/update.log" 2>&1 || { cat "$work/update.log" >&2; die "apt-get update failed."; }

install_packages() {
    # apt-get install $@, after a simulation showed that nothing is removed
    # and no system logger is pulled in.
    apt-get -s install --no-install-recommends "$@" >"$work/simulate.log" 2>&1 \
        || { cat "$work/simulate.log" >&2; die "apt-get cannot install $*"; }
    if grep -q '^Remv ' "$work/simulate.log"; then
        grep '^Remv ' "$work/simulate.log" >&2
        die "installing $* would remove the packages above; refusing. Install them yourself if that is acceptable."
    fi
    if grep -E -q '^Inst (rsyslog|syslog-ng|inetutils-syslogd|busybox-syslogd) ' "$work/simulate.log"; then
        die "installing $* would pull in a system logger package; refusing."
    fi
    apt-get install -y -q --no-install-recommends "$@" >"$work/install.log" 2>&1 \
        || { cat "$work/install.log" >&2; die "apt-get install $* failed."; }
}

if ! journald_works; then
    if [ -d /run/systemd/system ]; then
        die "this host runs systemd but $JOURNALD or journalctl does not work; check the systemd package."
    fi
    install_packages systemd
    journald_works || die "installed systemd, but $JOURNALD or journalctl still does not run."
fi

if ! rsyslog_works; then
    (cd "$work" && apt-get download rsyslog >"$work/download.log" 2>&1) \
        || { cat "$work/download.log" >&2; die "apt-get download rsyslog failed."; }
    deb="$(ls "$work"/rsyslog_*.deb)"
    # The libraries: every "lib" package of rsyslog's Depends (for "a | b",
    # the first such alternative); rsyslog itself is never installed.
    libs="$(dpkg-deb -f "$deb" Depends | tr ',' '\n' | while read -r alt; do
        printf '%s\n' "$alt" | tr '|' '\n' | sed -e 's/(.*)//' -e 's/:.*//' -e 's/[[:space:]]//g' \
            | grep -E '^lib[a-z0-9.+-]+$' | head -n 1
    done | sort -u | tr "\n" " " | sed "s/ $//")"
    if [ -n "$libs" ]; then
        # shellcheck disable=SC2086 # one word per package
        install_packages $libs
    fi
    # Unpack into a fresh directory and move it into place, so that an
    # interrupted run never leaves a half-unpacked prefix that looks complete.
    rm -rf "$PREFIX.new"
    mkdir -p "$PREFIX.new"
    dpkg -x "$deb" "$PREFIX.new"
    rm -rf "$PREFIX.old"
    if [ -e "$PREFIX" ]; then
        mv "$PREFIX" "$PREFIX.old"
    fi
    mv "$PREFIX.new" "$PREFIX"
    rm -rf "$PREFIX.old"
    rsyslog_works || die "unpacked rsyslog into $PREFIX, but '$RSYSLOGD -v' fails: $("$RSYSLOGD" -v 2>&1 | head -n 3)"
fi

rsyslog_version="$("$RSYSLOGD" -v 2>/dev/null | sed -n '1s/^rsyslogd  *\([^ ,]*\).*/\1/p')"
journald_version="$(journalctl --version 2>/dev/null | sed -n '1s/^systemd \([^ ]*\).*/\1/p')"
echo "install-log-daemons: rsyslogd ${rsyslog_version:-(unknown version)} unpacked into $PREFIX (not started);" \
     "systemd-journald ${journald_version:-(unknown version)} at $JOURNALD (not started)."
