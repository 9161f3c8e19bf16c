"""A tiny supervisor that ties a command's life to its parent's (stdlib only, cheap to import).

    python -m sd2_core.tether PARENT_PID [--grace SECONDS] [--pid-fd FD] -- COMMAND [ARG ...]

Why: a process killed with SIGKILL cannot clean up, and its children are re-parented and keep
running (a server keeps its port and its CPU). This process sits between the parent and the
command: it notices the parent is gone (Linux parent-death signal, and polling everywhere), and
then stops the command's whole process group: SIGTERM, a grace period, SIGKILL. SIGTERM, SIGINT
or SIGHUP sent to it stop the command the same way. It exits with the command's exit code.

`sd2_core.processes.start_tethered` is the way to use it.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable

POLL_SECONDS = 0.2
PR_SET_PDEATHSIG = 1
# The kernel sends the parent-death signal when the *thread* that started us exits, not only when
# the parent process does (a task thread may start a server). So it only wakes the loop, which
# then checks getppid(); a stop signal (SIGTERM) could not tell the two apart.
PARENT_DEATH_SIGNAL = signal.SIGUSR1


def _libc_prctl() -> Callable[..., int] | None:
    """libc's prctl on Linux, None elsewhere (macOS and others rely on polling alone)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # libc is loaded already; find_library would fork
    except (OSError, AttributeError):
        return None


def _set_parent_death_signal(prctl: Callable[..., int] | None, sig: int) -> None:
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _exit_code(returncode: int) -> int:
    """A shell-style exit code: a command killed by signal N exits as 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _stat_fields(pid: str) -> list[str]:
    """State, ppid, pgrp, ... of /proc/PID/stat (the command name may hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return []
    return text[text.rfind(")") + 2 :].split()


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs. On Linux a zombie does not count: it holds no port or memory,
    and an orphan zombie waits for PID 1, which may reap slowly (or never, in some containers)."""
    if os.path.isdir("/proc/self"):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                fields = _stat_fields(entry.name)
                if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                    return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(child: subprocess.Popen, sig: int, grace: float) -> int:
    """Send `sig` to the child's process group, wait up to `grace` s for all of it to end, then SIGKILL it.

    Waits for the whole group, not only the child: a grandchild left behind would keep the port.
    """
    pgid = child.pid  # the child leads its own session, hence its own group
    _signal_group(pgid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if child.poll() is not None and not _group_alive(pgid):
            return child.returncode
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    return child.wait()


class _Signals:
    """Signal handlers that only record what arrived; the main loop acts on it."""

    def __init__(self) -> None:
        self.stop_signal: int | None = None
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self.wakeup_fd = read_fd
        # a signal writes a byte here, so the loop's select() returns at once instead of at the next poll
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        signal.signal(PARENT_DEATH_SIGNAL, self._wake)
        signal.signal(signal.SIGCHLD, self._wake)

    def _stop(self, signum: int, frame: object) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum

    def _wake(self, signum: int, frame: object) -> None:
        pass

    def wait(self, seconds: float) -> None:
        ready, _, _ = select.select([self.wakeup_fd], [], [], seconds)
        if ready:
            os.read(self.wakeup_fd, 512)


def _parse(argv: list[str]) -> tuple[int, float, int | None, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: python -m sd2_core.tether PARENT_PID [--grace S] [--pid-fd FD] -- COMMAND ...")
    split = argv.index("--")
    head, command = argv[:split], argv[split + 1 :]
    if not head or not command:
        raise SystemExit("sd2_core.tether: need PARENT_PID and a COMMAND")
    parent, grace, pid_fd = int(head[0]), 5.0, None
    options = head[1:]
    while options:
        name, value, options = options[0], options[1], options[2:]
        if name == "--grace":
            grace = float(value)
        elif name == "--pid-fd":
            pid_fd = int(value)
        else:
            raise SystemExit(f"sd2_core.tether: unknown option {name}")
    return parent, grace, pid_fd, command


def _report(pid_fd: int | None, line: str) -> None:
    """Tell the starter the command's pid (or why it did not start) on its private pipe, once."""
    if pid_fd is not None:
        try:
            os.write(pid_fd, (line + "\n").encode())
        finally:
            os.close(pid_fd)


def main(argv: list[str] | None = None) -> int:
    parent, grace, pid_fd, command = _parse(sys.argv[1:] if argv is None else argv)
    signals = _Signals()  # handlers first: the parent-death signal must not kill us with its default action
    prctl = _libc_prctl()
    _set_parent_death_signal(prctl, PARENT_DEATH_SIGNAL)
    if os.getppid() != parent:  # the parent died before the kernel was asked to tell us
        _report(pid_fd, "error: parent process is gone")
        return 1

    supervisor = os.getpid()

    def in_child() -> None:
        # The command dies too if this supervisor is itself killed with SIGKILL (nothing else could stop it then).
        _set_parent_death_signal(prctl, signal.SIGKILL)
        if os.getppid() != supervisor:
            os._exit(1)

    try:
        child = subprocess.Popen(command, start_new_session=True, preexec_fn=in_child if prctl else None)
    except OSError as exc:
        _report(pid_fd, f"error: {exc}")
        return 127
    _report(pid_fd, f"pid {child.pid}")

    while True:
        if child.poll() is not None:
            # the command ended on its own: stop what it left in its group, pass its exit code on
            stop_group(child, signal.SIGTERM, grace)
            return _exit_code(child.returncode)
        if signals.stop_signal is not None:
            return _exit_code(stop_group(child, signals.stop_signal, grace))
        if os.getppid() != parent:
            return _exit_code(stop_group(child, signal.SIGTERM, grace))
        signals.wait(POLL_SECONDS)


if __name__ == "__main__":
    raise SystemExit(main())
