#!/bin/bash
# Install what tests/test_deb.py needs to build, check and install qrunner's Debian package: the build
# dependencies debian/control names (debhelper, dh-virtualenv, python3-dev, python3-venv, build-essential),
# lintian, and man-db (so that man -w finds the package's pages).
#
# Idempotent: installs nothing when all are there. Run as root on Debian (make test, CI); anywhere else it
# explains why it did nothing and exits 0: the package test then skips (or fails, under QRUNNER_REQUIRE_MTA=1).
set -u

say() { printf '%s\n' "install-deb-tools: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    say "not running as root; not installing the Debian packaging tools (the package test will skip)."
    exit 0
fi
if [ ! -r /etc/debian_version ] || ! command -v apt-get >/dev/null 2>&1; then
    say "this is not a Debian system; the package test needs Debian's packaging tools (it will skip)."
    exit 0
fi

cd "$(dirname "$0")/../.." || exit 1
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing=""
for pkg in lintian man-db dpkg-dev; do installed "$pkg" || missing="$missing $pkg"; done
if [ -z "$missing" ] && dpkg-checkbuilddeps 2>/dev/null; then
    exit 0
fi

set -e
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
[ -z "$missing" ] || apt-get install -y -q --no-install-recommends $missing
apt-get build-dep -y -q ./
say "installed the build dependencies of debian/control,$missing."
