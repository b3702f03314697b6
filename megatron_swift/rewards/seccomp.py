"""The system-call filter of a sandbox box, built with libseccomp (the library Flatpak, systemd and
container runtimes use) and handed to bubblewrap (``--seccomp FD``).

What bubblewrap alone leaves a box (found by trying, issue 25's review): new user namespaces inside it,
where the code holds every capability over its own namespaces (kernel attack surface: netfilter,
io_uring...), and the per-uid kernel keyring, which outlives the box and so carries data from one job to
the next. The filter refuses (EPERM) the system calls that reach those and other kernel surfaces test
code never needs; ``clone``/``clone3`` with namespace flags are refused too (``clone3`` answers ENOSYS,
as under Flatpak, so the C library falls back to ``clone``, whose flags the filter can read). Calls from
another ABI (32-bit on x86-64) kill the process: the filter only knows the native numbers.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from typing import Optional, Tuple

DENIED = (
    "add_key", "keyctl", "request_key",                       # the per-uid keyring outlives the box
    "unshare", "setns",                                       # namespaces of its own
    "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount", "open_tree", "fsopen",
    "fsmount", "fsconfig", "fspick",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open", "userfaultfd",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "acct", "syslog", "quotactl", "open_by_handle_at", "name_to_handle_at", "lookup_dcookie",
    "uselib", "vhangup",
)
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
_NAMESPACE_FLAGS = (0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000, 0x80)
_ACT_ALLOW = 0x7FFF0000
_CMP_MASKED_EQ = 7


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


_lock = threading.Lock()
_compiled: Optional[Tuple[Optional[bytes], str]] = None


def filter_program() -> Tuple[Optional[bytes], str]:
    """(the BPF program as bytes, "") or (None, why it cannot be built here); built once per process."""
    global _compiled
    with _lock:
        if _compiled is None:
            try:
                _compiled = (_build(), "")
            except OSError as e:
                _compiled = (None, str(e))
        return _compiled


def _library():
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        raise OSError("libseccomp is not installed (apt-get install libseccomp2; dnf install libseccomp)") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _build() -> bytes:
    lib = _library()
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        for name in DENIED:
            _rule(lib, ctx, _errno_action(errno.EPERM), name)
        _rule(lib, ctx, _errno_action(errno.ENOSYS), "clone3")  # its flags sit in memory the filter cannot read
        for flag in _NAMESPACE_FLAGS:
            _rule(lib, ctx, _errno_action(errno.EPERM), "clone", _ArgCmp(0, _CMP_MASKED_EQ, flag, flag))
        fd = os.memfd_create("seccomp")
        try:
            if lib.seccomp_export_bpf(ctx, fd) != 0:
                raise OSError("seccomp_export_bpf failed")
            os.lseek(fd, 0, os.SEEK_SET)
            return _read_all(fd)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def _rule(lib, ctx, action: int, name: str, *compare: _ArgCmp) -> None:
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number < 0:  # not a system call of this architecture (vm86 on arm64, say)
        return
    args = (_ArgCmp * len(compare))(*compare) if compare else None
    rc = lib.seccomp_rule_add_array(ctx, action, number, len(compare), args)
    if rc != 0:
        raise OSError(f"seccomp_rule_add({name}) failed: {os.strerror(-rc)}")


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
