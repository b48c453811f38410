#!/bin/bash
# Start a real system logger for the log tests (tests/log_daemons.py), inside
# the private mount and pid namespace this script is started in:
#
#     unshare --mount --pid --fork --kill-child [--mount-proc] \
#         bash tests/setup/log-namespace.sh KIND DIR
#
# KIND is one of
#   none             no logger at all: no /dev/log, no journal socket (a bare container);
#   rsyslog          rsyslogd -n listening on /dev/log, as on a host without systemd;
#   journald         systemd-journald with volatile storage, as on a minimal Debian 12;
#   journald+rsyslog journald forwarding to rsyslogd (ForwardToSyslog=yes), as on
#                    Debian 12 with the rsyslog package installed.
# DIR (the test's own directory) gets the configuration, the daemons' stderr
# and rsyslog's files: mail.log (the mail facility, as Debian's rsyslog.conf
# writes /var/log/mail.log) and all.log (every line, with its facility and
# severity).
#
# Everything the daemons create lives on tmpfs mounts of this namespace:
# /run (journald's sockets and journal, a private /run/systemd/journal), /dev
# (a copy of the host's /dev without its log socket, so that /dev/log is this
# namespace's), /etc/systemd (journald's configuration) and /var/log/journal.
# The host's /dev/log, /run, configuration and journal are never touched, and
# the daemons die with the namespace. When the logger listens, "ready" is printed; if it cannot start,
# the reason goes to stderr and the exit status is not 0.
set -eu

KIND="$1"
DIR="$2"
RSYSLOG_PREFIX="${QRUNNER_TEST_RSYSLOG_PREFIX:-/opt/qrunner-test-rsyslog}"
JOURNALD=/lib/systemd/systemd-journald

fail() { printf 'log-namespace: %s\n' "$*" >&2; exit 1; }

# A fresh tmpfs over the directory $1, hiding what the host has there.
private_dir() { [ -d "$1" ] || fail "no directory $1"; mount -t tmpfs -o mode=755 tmpfs "$1"; }

private_dev() {
    # /dev again, every host entry but the log socket: devices and the
    # pts/shm/mqueue mounts bound from the host's, its symlinks copied.
    local host=/run/qrunner-test/host-dev name
    mkdir "$host"
    mount --rbind /dev "$host"
    mount -t tmpfs -o mode=755 tmpfs /dev
    for entry in "$host"/*; do
        name="${entry##*/}"
        if [ "$name" = log ]; then
            continue
        elif [ -L "$entry" ]; then
            cp -P "$entry" "/dev/$name"
        elif [ -d "$entry" ]; then
            mkdir "/dev/$name" && mount --rbind "$entry" "/dev/$name"
        elif [ -b "$entry" ] || [ -c "$entry" ]; then
            touch "/dev/$name" && mount --bind "$entry" "/dev/$name"
        fi
    done
}

wait_for_socket() {  # $1: the socket, $2: the daemon's pid, $3: its name
    for _ in $(seq 1 200); do
        [ -S "$1" ] && return 0
        kill -0 "$2" 2>/dev/null || fail "$3 exited before it listened on $1: $(tail -n 5 "$DIR/$3.stderr")"
        sleep 0.05
    done
    fail "$3 did not listen on $1 within 10 s: $(tail -n 5 "$DIR/$3.stderr")"
}

start_rsyslog() {  # $1: the socket rsyslogd reads (its imuxsock SysSock.Name)
    local moddir="$RSYSLOG_PREFIX/usr/lib/x86_64-linux-gnu/rsyslog"
    [ -x "$RSYSLOG_PREFIX/usr/sbin/rsyslogd" ] || fail "no rsyslogd in $RSYSLOG_PREFIX (run tests/setup/install-log-daemons.sh as root)"
    mkdir -p "$DIR/rsyslog-work"
    cat >"$DIR/rsyslog.conf" <<CONF
global(workDirectory="$DIR/rsyslog-work")
module(load="imuxsock" SysSock.Name="$1" SysSock.RateLimit.Interval="0")
template(name="WithPriority" type="string" string="%syslogfacility-text%.%syslogseverity-text% %syslogtag%%msg:::sp-if-no-1st-sp%%msg:::drop-last-lf%\n")
mail.*  action(type="omfile" file="$DIR/mail.log" template="RSYSLOG_TraditionalFileFormat")
*.*     action(type="omfile" file="$DIR/all.log" template="WithPriority")
CONF
    "$RSYSLOG_PREFIX/usr/sbin/rsyslogd" -n -f "$DIR/rsyslog.conf" -i "$DIR/rsyslogd.pid" -M "$moddir" \
        >"$DIR/rsyslogd.stdout" 2>"$DIR/rsyslogd.stderr" &
    wait_for_socket "$1" $! rsyslogd
}

start_journald() {  # $1: ForwardToSyslog's value
    [ -x "$JOURNALD" ] || fail "no $JOURNALD (run tests/setup/install-log-daemons.sh as root)"
    [ -s /etc/machine-id ] || fail "/etc/machine-id is missing or empty; journald names its journal after it"
    # Only this configuration counts: the host's drop-ins, its kernel command line's systemd.journald.*
    # options and its persistent journal are hidden.
    private_dir /etc/systemd
    for dropins in /usr/lib/systemd/journald.conf.d /usr/local/lib/systemd/journald.conf.d /var/log/journal; do
        [ ! -d "$dropins" ] || private_dir "$dropins"
    done
    : >/run/qrunner-test/cmdline
    mount --bind /run/qrunner-test/cmdline /proc/cmdline
    cat >/etc/systemd/journald.conf <<CONF
[Journal]
Storage=volatile
ForwardToSyslog=$1
ForwardToWall=no
ReadKMsg=no
Audit=no
RateLimitIntervalSec=0
CONF
    cp /etc/systemd/journald.conf "$DIR/journald.conf"
    mkdir -p /run/systemd/journal /run/log
    "$JOURNALD" >"$DIR/systemd-journald.stdout" 2>"$DIR/systemd-journald.stderr" &
    wait_for_socket /run/systemd/journal/socket $! systemd-journald
    # systemd-journald-dev-log.socket's Symlinks=/dev/log, as on a systemd host.
    ln -sf /run/systemd/journal/dev-log /dev/log
}

private_dir /run
mkdir -p /run/qrunner-test
private_dev
case "$KIND" in
    none) sleep infinity & ;;  # nothing listens; something must keep the namespace
    rsyslog) start_rsyslog /dev/log ;;
    journald) start_journald no ;;
    journald+rsyslog)
        mkdir -p /run/systemd/journal
        start_rsyslog /run/systemd/journal/syslog  # syslog.socket's ListenDatagram=, which journald forwards to
        start_journald yes ;;
    *) fail "unknown kind $KIND (none, rsyslog, journald or journald+rsyslog)" ;;
esac
echo ready
# Pid 1 of the namespace: when it ends, the kernel ends every daemon in it.
wait
