"""The seccomp filter on everything sandboxed: system calls world code never needs, refused.

A verifier or a world server is Python doing SQL and serving HTTP: it never needs to trace or
read another process (ptrace, process_vm_readv/writev: with them code could take over the
sandbox's PID 1 and outlive its sandbox), SysV IPC (shared memory that outlives a
verification), keyrings (bubblewrap gives no keyring of its own), new namespaces, mounts,
kernel modules, BPF, perf, userfaultfd or io_uring (large kernel surfaces). Those calls fail
with EPERM; `clone3` fails with ENOSYS so that the C library falls back to `clone`, whose
namespace flags are refused. Calls of another ABI (32-bit) kill the process (libseccomp's
default for a foreign architecture).

The filter is built by libseccomp (through `pyseccomp`, its ctypes binding) and handed to
bubblewrap as BPF on a descriptor (`bwrap --seccomp FD`), which loads it in the sandbox just
before it runs the command. Where libseccomp cannot be loaded, `bpf()` raises
`SeccompUnavailable`, which the sandbox reports like a missing bwrap.
"""

from __future__ import annotations

import errno
import functools
import os

DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semtimedop", "semctl",
    "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend",
    "mq_timedreceive", "mq_notify", "mq_getsetattr",
    "add_key", "request_key", "keyctl",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "open_by_handle_at", "name_to_handle_at", "acct", "swapon", "swapoff",
    "reboot", "syslog", "quotactl", "personality", "lookup_dcookie", "vhangup",
)  # fmt: skip
_NAMESPACE_FLAGS = (
    0x10000000,  # CLONE_NEWUSER
    0x00020000,  # CLONE_NEWNS
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x08000000,  # CLONE_NEWIPC
    0x04000000,  # CLONE_NEWUTS
    0x02000000,  # CLONE_NEWCGROUP
)


class SeccompUnavailable(RuntimeError):
    """libseccomp (or its Python binding) cannot be loaded here."""


@functools.cache
def bpf() -> bytes:
    """The filter as BPF bytes, built once per process."""
    try:
        import pyseccomp as seccomp
    except (ImportError, RuntimeError, OSError) as error:
        raise SeccompUnavailable(f"libseccomp cannot be loaded: {error}") from None
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in DENIED:
        if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) >= 0:
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for flag in _NAMESPACE_FLAGS:
        rules.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ,
                                                                         flag, flag))  # fmt: skip
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(write_end, "wb") as sink:
            rules.export_bpf(sink)
        with os.fdopen(read_end, "rb") as source:
            read_end = -1
            return source.read()
    finally:
        if read_end >= 0:
            os.close(read_end)


def bpf_fd() -> int:
    """A fresh descriptor holding the filter at offset 0, for one bwrap (which reads it)."""
    fd = os.memfd_create("echo-jax-seccomp", os.MFD_CLOEXEC)
    data = bpf()
    while data:
        data = data[os.write(fd, data) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
