#!/bin/sh
# Installs bubblewrap, the isolator of the code-execution reward's sandbox (rewards/isolator.py), and
# libseccomp (its system-call filter, rewards/seccomp.py), when they are missing. A distribution package (Flatpak's bwrap): apt-get on Debian/Ubuntu, dnf/yum on Fedora/RHEL,
# zypper, apk, pacman. Uses sudo when not root. Exits 1, saying what to do, when it cannot install it.
set -e
has_seccomp() {  # ldconfig may sit in an sbin folder that is not on PATH
    { ldconfig -p || /sbin/ldconfig -p || /usr/sbin/ldconfig -p; } 2>/dev/null | grep -q 'libseccomp\.so\.2' \
        || ls /usr/lib/*/libseccomp.so.2 /lib/*/libseccomp.so.2 /usr/lib64/libseccomp.so.2 >/dev/null 2>&1
}
if command -v bwrap >/dev/null 2>&1 && command -v setpriv >/dev/null 2>&1 && command -v prlimit >/dev/null 2>&1 \
        && has_seccomp; then
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
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap util-linux libseccomp2 >/dev/null
elif command -v dnf >/dev/null 2>&1; then $SUDO dnf install -y -q bubblewrap util-linux libseccomp
elif command -v yum >/dev/null 2>&1; then $SUDO yum install -y -q bubblewrap util-linux libseccomp
elif command -v zypper >/dev/null 2>&1; then $SUDO zypper --non-interactive install bubblewrap util-linux libseccomp2
elif command -v apk >/dev/null 2>&1; then $SUDO apk add --quiet bubblewrap util-linux libseccomp
elif command -v pacman >/dev/null 2>&1; then $SUDO pacman -S --noconfirm bubblewrap util-linux libseccomp
else
    echo "install_isolator: no known package manager: install bubblewrap (bwrap), util-linux and libseccomp by hand" >&2
    exit 1
fi
command -v bwrap >/dev/null 2>&1
