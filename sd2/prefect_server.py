"""The Prefect API a command talks to: PREFECT_API_URL if set, else a temporary local server that ends with it.

Why not Prefect's own temporary server: it is a plain child process, so when sd2 is killed with SIGKILL
(OOM killer, pre-empted node, `kill -9`) it keeps running with its port and CPU. This one is started
through `sd2_core.processes.start_tethered`, which stops it whatever ends the sd2 process.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import prefect
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from sd2_core.processes import free_port, start_tethered, wait_until_healthy

log = logging.getLogger("sd2")

DEFAULT_STARTUP_TIMEOUT = 180.0  # Prefect's own 20 s is too short on a busy 2-core laptop
ATTEMPTS = 3  # uvicorn exits at once if another process took the port between our check and its bind


class PrefectServerError(RuntimeError):
    """The temporary Prefect server did not come up."""


def startup_timeout() -> float:
    """PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS if the user set it, else 180 s."""
    ephemeral = get_current_settings().server.ephemeral
    if "startup_timeout_seconds" in ephemeral.model_fields_set:
        return float(ephemeral.startup_timeout_seconds)
    return DEFAULT_STARTUP_TIMEOUT


def _server_command(port: int) -> list[str]:
    """The command Prefect's SubprocessASGIServer._run_uvicorn_command runs (prefect 3.8)."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(prefect.__module_path__.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]


def _server_env() -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",  # no UI, only the services an ephemeral server needs
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def _tail(output: IO[bytes], limit: int = 2000) -> str:
    output.seek(0)
    text = output.read().decode(errors="replace").strip()
    return text[-limit:] or "(no output)"


@contextmanager
def temporary_server(timeout: float | None = None) -> Iterator[str]:
    """Start a local Prefect server on a free port, yield its API URL, stop it on exit (also on errors)."""
    timeout = startup_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryFile() as output:
        for attempt in range(1, ATTEMPTS + 1):
            port = free_port()
            api_url = f"http://127.0.0.1:{port}/api"
            output.seek(0)
            output.truncate()
            started = time.monotonic()
            server = start_tethered(_server_command(port), _server_env(), stdout=output, stderr=output)
            try:
                log.info(
                    "temporary Prefect server at %s (pid %d); it stops with this command — point PREFECT_API_URL "
                    "at a long-lived 'prefect server start' to skip this start-up",
                    api_url,
                    server.pid,
                )
                if wait_until_healthy(server, f"{api_url}/health", deadline):
                    log.debug("temporary Prefect server answered after %.1f s", time.monotonic() - started)
                    break
                if server.poll() is None:
                    raise PrefectServerError(
                        f"the temporary Prefect server at {api_url} did not answer within {timeout:.0f} s "
                        "(set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS to wait longer, or PREFECT_API_URL "
                        f"to use a running server); its output: {_tail(output)}"
                    )
                if attempt == ATTEMPTS or time.monotonic() >= deadline:
                    raise PrefectServerError(
                        f"the temporary Prefect server exited with code {server.returncode} before it answered "
                        f"({attempt} attempts); its output: {_tail(output)}"
                    )
                log.debug("temporary Prefect server on port %d exited with %s; another port", port, server.returncode)
            except BaseException:
                server.stop()
                raise
        try:
            yield api_url
        finally:
            server.stop()


def _drain_prefect_workers() -> None:
    """Send queued run logs and events while the server still listens (Prefect's test harness does the same)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=5)
        except Exception as exc:  # noqa: BLE001 - losing a log line must not fail the command
            log.debug("could not drain %s: %s", worker.__name__, exc)


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the body, so processes started in it see it too."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextmanager
def prefect_api(timeout: float | None = None) -> Iterator[str]:
    """Yield the API URL flows of this command report to.

    With PREFECT_API_URL set (environment or Prefect profile) nothing is started. Otherwise a temporary
    server runs for the body (a few seconds to tens of seconds of start-up) and stops afterwards, also on
    exceptions, Ctrl-C, SIGTERM, and even if this process is killed with SIGKILL.
    """
    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    with temporary_server(timeout) as api_url:
        with temporary_settings({PREFECT_API_URL: api_url}), _environment("PREFECT_API_URL", api_url):
            try:
                yield api_url
            finally:
                _drain_prefect_workers()
