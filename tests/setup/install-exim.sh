#!/bin/bash
# Unpack Debian's Exim into a private prefix so that the end-to-end tests can
# run a private Exim (tests/exim_instance.py) next to the installed Postfix.
#
# Why not "apt-get install exim4": Debian's exim4 and postfix packages
# conflict, and the tests need both MTAs on one machine (DESIGN.md section 5).
# Exim does not need to be installed to run: its binary only needs its shared
# libraries, the Debian-exim user and group, and a configuration given with
# -C that names its own spool, log and binary. So this script:
#
#   1. downloads exim4-base, exim4-daemon-light and exim4-config
#      (apt-get download) and unpacks them with dpkg -x into $PREFIX,
#      without running any maintainer script (no service is started, no
#      /etc/exim4 appears, dpkg does not consider Exim installed);
#   2. installs the shared libraries exim4-daemon-light depends on, as
#      ordinary packages, after apt-get's simulation showed that nothing
#      (postfix above all) would be removed;
#   3. creates the Debian-exim system user and group if missing (the binary
#      has them compiled in as its default exim_user/exim_group).
#
# Idempotent: when $PREFIX's exim4 binary already runs, it does nothing.
# Run as root on Debian (make test, CI); anywhere else it explains why it did
# nothing and exits 0, and the Exim tests skip (or fail, when
# QRUNNER_REQUIRE_MTA=1 says they must run). On success it prints one line.
set -u

PREFIX="${QRUNNER_TEST_EXIM_PREFIX:-/opt/qrunner-test-exim}"
BINARY="$PREFIX/usr/sbin/exim4"
PACKAGES="exim4-base exim4-daemon-light exim4-config"

say() { printf '%s\n' "install-exim: $*" >&2; }
die() { say "$*"; exit 1; }

if [ "$(id -u)" != 0 ]; then
    say "not running as root; not installing the private Exim (the Exim tests will skip)."
    exit 0
fi
if [ ! -r /etc/debian_version ] || ! command -v dpkg-deb >/dev/null 2>&1 \
        || ! command -v apt-get >/dev/null 2>&1; then
    say "this is not a Debian system; the private Exim is unpacked from Debian packages (the Exim tests will skip)."
    exit 0
fi

works() {
    # The binary runs and reports its version. -bV with a configuration of
    # /dev/null (an empty one is valid) needs no /etc/exim4 at all.
    [ -x "$BINARY" ] && "$BINARY" -C /dev/null -bV >/dev/null 2>&1
}

ensure_user() {
    # Debian's exim4-base postinst creates these; we run no postinst. The
    # binary refuses to start when its compiled-in exim_user is unknown.
    if ! getent group Debian-exim >/dev/null; then
        addgroup --system --quiet Debian-exim 2>/dev/null || groupadd --system Debian-exim \
            || die "could not create the group Debian-exim."
    fi
    if ! getent passwd Debian-exim >/dev/null; then
        adduser --system --quiet --ingroup Debian-exim --home /var/spool/exim4 \
                --no-create-home --disabled-login --force-badname Debian-exim 2>/dev/null \
            || useradd --system --gid Debian-exim --home-dir /var/spool/exim4 \
                       --no-create-home --shell /usr/sbin/nologin Debian-exim \
            || die "could not create the user Debian-exim."
    fi
}

ensure_user
if works; then
    exit 0
fi

set -e
export DEBIAN_FRONTEND=noninteractive
work="$(mktemp -d /tmp/qrunner-exim-install.XXXXXX)"
trap 'rm -rf "$work"' EXIT

apt-get update -q >"$work/update.log" 2>&1 || { cat "$work/update.log" >&2; die "apt-get update failed."; }
(cd "$work" && apt-get download $PACKAGES >"$work/download.log" 2>&1) \
    || { cat "$work/download.log" >&2; die "apt-get download $PACKAGES failed."; }

daemon_deb="$(ls "$work"/exim4-daemon-light_*.deb)"

# The libraries: every package of exim4-daemon-light's Depends whose name
# starts with "lib" (for "a | b", the first such alternative). Everything
# else there is Debian packaging (exim4-base, debconf) that a binary run from
# a private prefix does not need, and exim4-* would conflict with postfix.
libs="$(dpkg-deb -f "$daemon_deb" Depends | tr ',' '\n' | while read -r alt; do
    printf '%s\n' "$alt" | tr '|' '\n' | sed -e 's/(.*)//' -e 's/:.*//' -e 's/[[:space:]]//g' \
        | grep -E '^lib[a-z0-9.+-]+$' | head -n 1
done | sort -u | tr "\n" " " | sed "s/ $//")"

if [ -n "$libs" ]; then
    # Simulate first: refuse anything that would remove a package (apt could
    # resolve a library conflict by removing postfix or one of its libraries).
    apt-get -s install --no-install-recommends $libs >"$work/simulate.log" 2>&1 \
        || { cat "$work/simulate.log" >&2; die "apt-get cannot install the libraries Exim needs: $libs"; }
    if grep -q '^Remv ' "$work/simulate.log"; then
        grep '^Remv ' "$work/simulate.log" >&2
        die "installing Exim's libraries ($libs) would remove the packages above; refusing. Install them yourself if that is acceptable."
    fi
    if grep -q '^Inst exim4' "$work/simulate.log"; then
        die "installing Exim's libraries ($libs) would pull in Debian's exim4 packages, which conflict with postfix; refusing."
    fi
    apt-get install -y -q --no-install-recommends $libs >"$work/install.log" 2>&1 \
        || { cat "$work/install.log" >&2; die "apt-get install $libs failed."; }
fi

# Unpack into a fresh directory and move it into place, so that an
# interrupted run never leaves a half-unpacked prefix that looks complete.
rm -rf "$PREFIX.new"
mkdir -p "$PREFIX.new"
for deb in "$work"/*.deb; do
    dpkg -x "$deb" "$PREFIX.new"
done
# dpkg -x keeps the packaged modes: exim4 is setuid root. The tests run it
# as root with -C; dropping the setuid bit makes sure that no other user can
# use this private copy to run a configuration of their choosing.
chmod u-s "$PREFIX.new/usr/sbin/exim4"
rm -rf "$PREFIX.old"
if [ -e "$PREFIX" ]; then
    mv "$PREFIX" "$PREFIX.old"
fi
mv "$PREFIX.new" "$PREFIX"
rm -rf "$PREFIX.old"

works || die "unpacked Exim into $PREFIX, but '$BINARY -C /dev/null -bV' fails: $("$BINARY" -C /dev/null -bV 2>&1 | head -n 3)"
version="$("$BINARY" -C /dev/null -bV 2>/dev/null | sed -n '1s/^Exim version \([^ ]*\).*/\1/p')"
echo "install-exim: Exim ${version:-(unknown version)} unpacked into $PREFIX (libraries: ${libs:-none})."
