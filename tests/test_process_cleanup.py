"""Nothing sd2 starts outlives it: tethered processes die with their parent, also on SIGKILL.

Unit tests use real python processes; the end-to-end tests run the real `sd2 cell` with its real temporary
Prefect server, kill it, and look at the process table (/proc) and the port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from sd2_core.config import profile
from sd2_core.processes import start_tethered

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the Linux process table")

PY = sys.executable
SD2 = str(Path(sys.executable).parent / "sd2")
SERVER_LINE = re.compile(r"temporary Prefect server at (http://127\.0\.0\.1:(\d+)/api) \(pid (\d+)\)")
# a command that starts a grandchild (same process group), writes both pids, then sleeps
FAMILY = (
    "import subprocess, sys, time; "
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
    "open(sys.argv[1] + '.tmp', 'w').write(f'{__import__(\"os\").getpid()} {g.pid}'); "
    "__import__('os').replace(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(600)"
)


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    """Poll until `condition()` is truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.05)


def stat(pid: int) -> list[str] | None:
    """[state, ppid, pgrp, ...] from /proc/PID/stat; None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def running(pid: int) -> bool:
    """A zombie does not count: it has ended (an orphan one waits for PID 1 to reap it)."""
    fields = stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def port_free(port: int) -> bool:
    """Whether a new server could listen on the port (SO_REUSEADDR as servers do: TIME_WAIT is no obstacle)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


# --- the tether itself ---------------------------------------------------------------------------------------


def test_tethered_family_dies_when_its_parent_is_killed(tmp_path: Path) -> None:
    pids_file = tmp_path / "family"
    parent_code = (
        "import sys, time\n"
        "from sd2_core.processes import start_tethered\n"
        f"p = start_tethered([sys.executable, '-c', {FAMILY!r}, {str(pids_file)!r}])\n"
        "print(p.supervisor_pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([PY, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        wait_for(pids_file.exists, 60, "the tethered command started its grandchild")
        command, grandchild = map(int, pids_file.read_text().split())
        supervisor = int(parent.stdout.readline())  # printed as soon as start_tethered returned
        assert all(running(p) for p in (supervisor, command, grandchild))
        assert stat(supervisor)[1] == str(parent.pid) and "sd2_core.tether" in cmdline(supervisor)
        parent.kill()
        parent.wait()
        wait_for(lambda: not any(running(p) for p in (supervisor, command, grandchild)), 10, "the family ended")
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_stop_ends_command_and_grandchild_cleanly(tmp_path: Path) -> None:
    pids_file, stopped = tmp_path / "family", tmp_path / "stopped"
    on_term = (
        f"import signal, sys; signal.signal(signal.SIGTERM, lambda *a: (open({str(stopped)!r}, 'w'), sys.exit(0))); "
    )
    with start_tethered([PY, "-c", on_term + FAMILY, str(pids_file)]) as proc:
        wait_for(pids_file.exists, 60, "the command started")
        command, grandchild = map(int, pids_file.read_text().split())
        assert proc.pid == command and proc.poll() is None
        assert stat(grandchild)[2] == str(command)  # the command leads the group that is stopped
        started = time.monotonic()
        assert proc.stop() == 0  # the command's own exit code: it handled SIGTERM
        assert time.monotonic() - started < proc.grace
    assert stopped.exists()
    assert not running(command) and not running(grandchild) and stat(proc.supervisor_pid) is None


def test_stop_kills_a_command_that_ignores_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    code += "open(sys.argv[1], 'w'); time.sleep(600)"
    proc = start_tethered([PY, "-c", code, str(ready)], grace=0.5)
    wait_for(ready.exists, 60, "the command ignores SIGTERM")
    assert proc.stop() == 128 + signal.SIGKILL
    assert not running(proc.pid)


def test_command_outlives_the_thread_that_started_it() -> None:
    """Linux sends the parent-death signal when the starting *thread* ends; a task thread may start a server."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("proc", start_tethered(["sleep", "600"])))
    thread.start()
    thread.join()
    proc = box["proc"]
    try:
        time.sleep(1.0)  # the signal comes at once when the thread ends; give the supervisor time to misreact
        assert proc.poll() is None and running(proc.pid)
    finally:
        proc.stop()


def test_a_swallowed_sigterm_still_ends_the_process_and_its_tethered_child() -> None:
    parent_code = (
        "import signal, sys, time\n"
        "from sd2_core.processes import start_tethered, stop_signal_deadline\n"
        "with stop_signal_deadline(grace=1.0):\n"
        "    signal.signal(signal.SIGTERM, lambda *a: None)  # a library's handler that loses the stop request\n"
        "    p = start_tethered([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "    print(p.pid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    parent = subprocess.Popen([PY, "-c", parent_code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 128 + signal.SIGTERM
        assert "still running 1 s after SIGTERM" in parent.stderr.read()
        wait_for(lambda: not running(child), 10, "the tethered child ended")
    finally:
        parent.kill()
        parent.communicate()


def test_a_missing_command_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="no-such-command"):
        start_tethered([str(tmp_path / "no-such-command")])


# --- the Prefect API of a command ---------------------------------------------------------------------------------


def test_a_configured_api_url_starts_nothing() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from sd2.prefect_server import prefect_api

    before = descendants(os.getpid())
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with prefect_api() as url:
            assert url == "http://127.0.0.1:9/api"
            assert descendants(os.getpid()) <= before


def test_a_server_that_does_not_answer_in_time_is_a_clear_error_and_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sd2.prefect_server import PrefectServerError, temporary_server

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    before = descendants(os.getpid())
    with pytest.raises(PrefectServerError, match="did not answer within 0 s"):
        with temporary_server(timeout=0.1):
            pytest.fail("the server cannot have answered")
    assert descendants(os.getpid()) <= before


# --- sd2 cell with its temporary Prefect server -----------------------------------------------------------------


class Sd2Cell:
    """`sd2 cell --profile smoke` as a subprocess, with a private Prefect home; output goes to files."""

    def __init__(self, tmp_path: Path, name: str, config: Path | None = None):
        self.store = tmp_path / "store"
        self.stdout, self.stderr = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # its own SQLite database
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [SD2, "cell", *(["--config", str(config)] if config else ["--profile", "smoke"])]
                + ["--store", str(self.store), "--json"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def server(self) -> tuple[str, int, int]:
        """(API URL, port, pid) of its temporary server, once it answers /api/health."""

        def announced() -> tuple[str, int, int] | None:
            assert self.proc.poll() is None, f"sd2 ended early:\n{self.log()[-3000:]}"
            found = SERVER_LINE.findall(self.log())
            return (found[-1][0], int(found[-1][1]), int(found[-1][2])) if found else None

        def healthy() -> bool:
            url = announced()
            try:
                return bool(url) and httpx.get(f"{url[0]}/health", timeout=2, trust_env=False).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 300, "the temporary Prefect server answers /api/health")
        return announced()

    def manifests(self) -> dict[Path, tuple[bytes, int]]:
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in self.store.glob("*/*/manifest.json")}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def cells():
    started: list[Sd2Cell] = []
    yield started
    for cell in started:
        cell.kill()


def test_killed_sd2_leaves_nothing_running_and_a_rerun_resumes(tmp_path: Path, cells: list[Sd2Cell]) -> None:
    cell = Sd2Cell(tmp_path, "killed")
    cells.append(cell)
    _, port, server = cell.server()
    supervisor = int(stat(server)[1])
    assert "sd2_core.tether" in cmdline(supervisor) and stat(supervisor)[1] == str(cell.proc.pid)
    before = wait_for(cell.manifests, 600, "a first complete artifact in the store")
    family = descendants(cell.proc.pid)
    # Prefect did not start a server of its own: ours is the only one
    assert {p for p in family if "-m uvicorn" in cmdline(p) and "sd2_core.tether" not in cmdline(p)} == {server}

    cell.kill()
    wait_for(lambda: not any(running(p) for p in family), 10, f"sd2's processes {sorted(family)} ended")
    wait_for(lambda: port_free(port), 10, f"port {port} is free")

    rerun = Sd2Cell(tmp_path, "rerun")
    cells.append(rerun)
    assert rerun.proc.wait(timeout=900) == 0, rerun.log()[-3000:]
    summary = json.loads(rerun.stdout.read_text())
    assert summary and isinstance(summary, dict)
    after = rerun.manifests()
    assert {p: after.get(p) for p in before} == before  # what was complete before the kill was not rebuilt


@pytest.mark.parametrize(
    ("sig", "code", "message"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_sigterm_and_ctrl_c_stop_sd2_and_its_server(
    tmp_path: Path, cells: list[Sd2Cell], sig: signal.Signals, code: int, message: str
) -> None:
    # a smoke cell whose fine-tuning lasts minutes: the signal always lands while the flow runs, never after it
    config = tmp_path / "long-smoke-cell.json"
    long = profile("smoke")
    config.write_text(
        long.model_copy(update={"finetune": long.finetune.model_copy(update={"steps": 100_000})}).model_dump_json()
    )
    cell = Sd2Cell(tmp_path, "stopped", config)
    cells.append(cell)
    _, port, server = cell.server()
    supervisor = int(stat(server)[1])
    wait_for(lambda: "Beginning flow run" in cell.log(), 120, "the cell flow started")
    cell.proc.send_signal(sig)
    assert cell.proc.wait(timeout=60) == code, cell.log()[-3000:]
    assert f"sd2: {message}" in cell.log() and "Traceback" not in cell.log()
    # normally sd2 stops its server itself before it exits; if Prefect lost the signal, the tether does it
    wait_for(lambda: not running(server) and not running(supervisor), 10, "the server and its supervisor ended")
    wait_for(lambda: port_free(port), 10, f"port {port} is free")
