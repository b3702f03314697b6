#!/bin/sh
# Installs bubblewrap, the isolator of the code-execution reward's sandbox (rewards/isolator.py), when it is
# missing. A distribution package (Flatpak's bwrap): apt-get on Debian/Ubuntu, dnf/yum on Fedora/RHEL,
# zypper, apk, pacman. Uses sudo when not root. Exits 1, saying what to do, when it cannot install it.
set -e
if command -v bwrap >/dev/null 2>&1 && command -v setpriv >/dev/null 2>&1 && command -v prlimit >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_isolator: bubblewrap is missing and this is not root (no sudo): ask for the 'bubblewrap' package" >&2
        exit 1
    fi
fi
if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap util-linux >/dev/null
elif command -v dnf >/dev/null 2>&1; then $SUDO dnf install -y -q bubblewrap util-linux
elif command -v yum >/dev/null 2>&1; then $SUDO yum install -y -q bubblewrap util-linux
elif command -v zypper >/dev/null 2>&1; then $SUDO zypper --non-interactive install bubblewrap util-linux
elif command -v apk >/dev/null 2>&1; then $SUDO apk add --quiet bubblewrap util-linux
elif command -v pacman >/dev/null 2>&1; then $SUDO pacman -S --noconfirm bubblewrap util-linux
else
    echo "install_isolator: no known package manager: install bubblewrap (bwrap) and util-linux by hand" >&2
    exit 1
fi
command -v bwrap >/dev/null 2>&1
