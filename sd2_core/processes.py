"""Child processes that never outlive the sd2 process that started them (stdlib only, but the httpx health check).

Why: when sd2 is killed with SIGKILL (OOM killer, pre-empted node, `kill -9`) no code of it runs,
so a server it started (the temporary Prefect server; later a vLLM server, a test Postgres, a
worker) would be re-parented and keep its CPU, memory and port. `start_tethered` runs each such
command under `sd2_core.tether`, a tiny supervisor that stops the command's whole process group as
soon as this process is gone, whatever ended it. On a normal exit, call `stop()` (or use the
returned object as a context manager) to stop it in order. `stop_signal_deadline` bounds how long
this process may take to end after SIGTERM/SIGINT, which the tethers make safe.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

DEFAULT_GRACE = 5.0  # seconds between SIGTERM and SIGKILL


@dataclass(eq=False)
class TetheredProcess:
    """A command running under a tether supervisor; `pid` is the command's, `supervisor.pid` the supervisor's."""

    supervisor: subprocess.Popen
    pid: int
    grace: float = DEFAULT_GRACE

    @property
    def supervisor_pid(self) -> int:
        return self.supervisor.pid

    @property
    def returncode(self) -> int | None:
        """The command's exit code once it ended (128 + N if signal N killed it), else None."""
        return self.supervisor.returncode

    def poll(self) -> int | None:
        """The command's exit code if it has ended (the supervisor exits with it), else None."""
        return self.supervisor.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.supervisor.wait(timeout)

    def stop(self, timeout: float | None = None) -> int:
        """Stop the command and everything in its process group; return its exit code.

        The supervisor sends SIGTERM, waits `grace` seconds, then SIGKILLs the group. If the supervisor
        itself does not finish within `timeout` (default grace + 5 s), it and the group are killed here.
        """
        if self.supervisor.poll() is None:
            try:
                self.supervisor.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            return self.supervisor.wait(self.grace + 5.0 if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.supervisor.kill()
            try:
                os.killpg(self.pid, signal.SIGKILL)  # the command leads its own process group
            except (ProcessLookupError, PermissionError):
                pass
            return self.supervisor.wait()

    def __enter__(self) -> TetheredProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _read_report(fd: int, timeout: float) -> str:
    """The supervisor's one-line report ('pid N' or 'error: ...'); '' if it exited without one."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the tether supervisor did not start its command within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 256)
            if not chunk:
                break
            data += chunk
    return data.decode().strip()


def start_tethered(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    grace: float = DEFAULT_GRACE,
    start_timeout: float = 60.0,
) -> TetheredProcess:
    """Start `cmd` so that it ends when this process ends, also on SIGKILL; return once it has started.

    `env` is the command's whole environment (None: this process's). stdin is /dev/null. The supervisor runs in
    a new session, so a terminal's Ctrl-C reaches only this process, which then stops its children in order.
    Raises OSError if the command cannot be started (e.g. not found).
    """
    read_fd, write_fd = os.pipe()
    try:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "sd2_core.tether", str(os.getpid()), "--grace", str(grace)]
            + ["--pid-fd", str(write_fd), "--", *cmd],
            env=None if env is None else dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
    try:
        report = _read_report(read_fd, start_timeout)
    except BaseException:
        supervisor.kill()
        supervisor.wait()
        raise
    finally:
        os.close(read_fd)
    if not report.startswith("pid "):
        code = supervisor.wait()
        raise OSError(f"could not start {list(cmd)!r}: {report or f'supervisor exited with code {code}'}")
    return TetheredProcess(supervisor=supervisor, pid=int(report.split()[1]), grace=grace)


class StopSignalWatch:
    """What `stop_signal_deadline` saw: `received` is the first SIGTERM/SIGINT (a signal number) or None."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.received: int | None = None

    def _watch(self, fd: int) -> None:
        deadline = None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                self._exit()
            data = os.read(fd, 64)
            if not data:  # the body ended and closed the pipe
                os.close(fd)
                return
            for signum in data:
                # only the first counts: Prefect re-sends SIGTERM to itself once it has handled it
                if signum in (signal.SIGTERM, signal.SIGINT) and self.received is None:
                    self.received, deadline = signum, time.monotonic() + self.grace

    def _exit(self) -> None:
        word = "interrupted" if self.received == signal.SIGINT else "terminated"
        name = signal.Signals(self.received).name
        sys.stderr.write(f"sd2: {word}, but still running {self.grace:.0f} s after {name}; exiting now\n")
        sys.stderr.flush()
        os._exit(128 + self.received)  # tethered children are stopped by their supervisors


@contextmanager
def stop_signal_deadline(grace: float = 20.0) -> Iterator[StopSignalWatch]:
    """Exit hard `grace` s after the first SIGTERM/SIGINT if the body has not ended by then.

    Why: a library may own the signal when it arrives (Prefect's flow engine installs its own SIGTERM handler) and
    may lose the exception it raises, or wait for worker threads; a stop request must still end the process.
    Tethered children are stopped by their supervisors when it exits. The signal is seen through the C-level
    wakeup fd, whichever Python handler is installed; only the main thread can set that up (elsewhere: no-op).
    """
    watch = StopSignalWatch(grace)
    if threading.current_thread() is not threading.main_thread():
        yield watch
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=watch._watch, args=(read_fd,), name="sd2-stop-deadline", daemon=True).start()
    try:
        yield watch
    finally:
        signal.set_wakeup_fd(previous)
        os.close(write_fd)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (a server may still lose it to another process)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(process: TetheredProcess, health_url: str, deadline: float, interval: float = 0.1) -> bool:
    """True once GET `health_url` answers 200; False if the process exited first, or at `deadline` (monotonic)."""
    import httpx

    with httpx.Client(trust_env=False, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                if client.get(health_url).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(interval)
    return False
