#!/bin/bash
# Install Debian's Postfix so that the end-to-end tests can run a private
# Postfix instance (tests/postfix_instance.py).
#
# Idempotent: does nothing when Postfix is already installed. Run as root on
# Debian (make test, CI). Anywhere else it explains why it did nothing and
# exits 0: the MTA tests then skip with a reason (or fail, when
# QRUNNER_REQUIRE_MTA=1 says they must run).
#
# The tests never use the system Postfix: they build their own instance in a
# temporary directory. So this script only installs the package; Debian's
# postinst may start the system Postfix, and we leave it as Debian set it up.
set -u

say() { printf '%s\n' "install-postfix: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    say "not running as root; not installing Postfix (the Postfix tests will skip)."
    exit 0
fi
if [ ! -r /etc/debian_version ] || ! command -v dpkg-query >/dev/null 2>&1 \
        || ! command -v apt-get >/dev/null 2>&1; then
    say "this is not a Debian system; install Postfix yourself (the Postfix tests skip until postconf is found)."
    exit 0
fi

installed() {
    # True when the dpkg package $1 is installed (not just known or removed).
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

if installed postfix && command -v postconf >/dev/null 2>&1; then
    exit 0
fi

for pkg in exim4-base exim4-daemon-light exim4-daemon-heavy; do
    if installed "$pkg"; then
        say "installing postfix would remove the installed Exim (Debian's postfix and exim4 packages conflict); run the tests on a machine without Exim, or install postfix yourself."
        exit 1
    fi
done

set -e
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
mailname="$(hostname -f 2>/dev/null || hostname)"
debconf-set-selections <<SEL
postfix postfix/main_mailer_type select Local only
postfix postfix/mailname string ${mailname:-localhost}
SEL
apt-get install -y -q postfix
if ! command -v postconf >/dev/null 2>&1; then
    say "apt-get installed postfix but postconf is not on PATH; check the installation."
    exit 1
fi
say "installed $(postconf -h mail_version 2>/dev/null | sed 's/^/Postfix /')."
