#!/bin/sh
# Create the system user qrunner's Lua worker runs the policy script as (setting script_user, default
# _qrunner): no home, no shell, no password, a group of its own. Idempotent: an existing user is left as
# it is. Run by `make install` and by the test setup (make install-test-deps); a package does the same in
# its postinst. Usage: create-script-user.sh [USER]
set -eu
user=${1:-_qrunner}
say() { printf '%s\n' "create-script-user: $*" >&2; }

if getent passwd "$user" >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    say "not root: cannot create the user $user (qrunner run as root refuses to start until it exists)."
    exit 0
fi
if command -v adduser >/dev/null 2>&1 && adduser --help 2>&1 | grep -q -- '--system'; then
    adduser --quiet --system --group --no-create-home --home /nonexistent "$user"
elif command -v useradd >/dev/null 2>&1; then
    getent group "$user" >/dev/null 2>&1 || groupadd --system "$user"
    useradd --system --gid "$user" --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user"
else
    say "neither adduser nor useradd found: create a system user $user yourself."
    exit 1
fi
say "created the system user $user (the policy script runs as it)."
