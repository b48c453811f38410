#!/bin/bash
# Install man-db and groff-base, which tests/test_man.py reads the manual pages with (man -l, groff -ww)
# and tests/test_uninstall.py finds the installed pages with (man -w). A minimal Debian 12 has neither.
#
# Idempotent: does nothing when both are there. Run as root on Debian (make test, CI); anywhere else it
# says why it did nothing and exits 0 (the manual tests then fail, naming what to install).
set -u

say() { printf '%s\n' "install-man-tools: $*" >&2; }

if command -v man >/dev/null 2>&1 && command -v groff >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    say "not root on Debian; install man-db and groff-base yourself (tests/test_man.py needs man and groff)."
    exit 0
fi
set -e
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends man-db groff-base
