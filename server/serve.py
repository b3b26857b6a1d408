"""``lsdm-server serve``: the SuperLink on loopback, the fleet gateway on the public address,
the sites' keys registered, and the training run started and watched.

Processes (all children of ``serve``, stopped when it stops):

- ``flower-superlink`` on 127.0.0.1 (TLS, SuperNode authentication, state database in
  ``state/superlink.db``); its Control API is reachable from this machine only;
- ``python -m server.gateway`` on ``--address``: the only thing sites can reach;
- the ServerApp, started by the SuperLink with ``flwr run`` (over loopback) from ``app/``, a
  folder holding only a ``pyproject.toml`` that names the installed ``server.server_app:app``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lsdm.atomic import atomic_write_text
from lsdm.errors import InputError
from lsdm.loopback import free_port
from server.settings import Coordinator

CONNECTION = "coordinator"


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


STARTUP_S = 180.0  # generous: a process that dies is noticed at once (``alive``)


def wait_for_port(host: str, port: int, timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise InputError(f"a coordinator process exited early (see {host}:{port} logs)")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise InputError(f"nothing listened on {host}:{port} within {timeout:.0f} s")


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Services:
    """The coordinator's child processes; ``stop()`` ends them all. They share ``serve``'s
    process group, so whatever kills the whole coordinator kills them too."""

    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator
        self.processes: list[subprocess.Popen] = []
        self.env = dict(os.environ)
        self.env["FLWR_HOME"] = str(coordinator.flwr_home)
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env["PATH"]])

    def start(self, command: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.coordinator.state / log_name, "ab")  # noqa: SIM115 (lives with the child)
        process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_bin("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=120
        )

    def stop(self) -> None:
        # the SuperLink's own children (SuperExec, a ServerApp mid-run) do not always go with it
        grandchildren = [pid for p in self.processes for pid in descendants(p.pid)]
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in grandchildren:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def write_flwr_config(coordinator: Coordinator, control_port: int) -> None:
    home = coordinator.flwr_home
    home.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        home / "config.toml",
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{control_port}"\nroot-certificates = "{coordinator.ca}"\n',
    )


def register_sites(services: Services) -> list[str]:
    """Register every key in ``sites/`` with the SuperLink (a key it knows already is fine)."""
    registered = []
    for name, key in services.coordinator.registered_sites().items():
        result = services.flwr("supernode", "register", str(key), CONNECTION, "--name", name)
        text = (result.stdout + result.stderr).lower()
        if result.returncode != 0 and "already" not in text:
            raise InputError(f"could not register site {name}: {text.strip()[-300:]}")
        registered.append(name)
    return registered


def start_run(services: Services, resume: bool) -> int:
    config = f'coordinator-dir="{services.coordinator.root}" resume={str(resume).lower()}'
    result = services.flwr(
        "run", str(services.coordinator.app), CONNECTION, "--run-config", config, "--format", "json"
    )
    try:
        return int(json.loads(result.stdout)["run-id"])
    except (ValueError, KeyError, TypeError):
        text = (result.stdout + result.stderr).strip()[-500:]
        raise InputError(f"flwr run failed: {text}") from None


def run_status(services: Services, run_id: int) -> str:
    result = services.flwr("ls", "--run-id", str(run_id), CONNECTION, "--format", "json")
    try:
        runs = json.loads(result.stdout)["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError, TypeError):
        return "unknown"


def serve(
    root: Path,
    address: str,
    resume: bool,
    on_event: Callable[[dict], None],
    poll_s: float = 1.0,
    status_every_s: float = 15.0,
) -> dict:
    """Run the federation to the end (or until interrupted); returns the last run-log entry."""
    coordinator = Coordinator(root)
    coordinator.settings()
    coordinator.policy()
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--address must be HOST:PORT, not {address!r}")
    if coordinator.checkpoint.is_file() and not resume:
        raise InputError(f"{coordinator.root} holds a checkpoint already: continue with --resume")
    if resume and not coordinator.checkpoint.is_file():
        raise InputError(f"nothing to resume: no checkpoint in {coordinator.state}")
    coordinator.state.mkdir(parents=True, exist_ok=True)
    # SIGTERM ends serve like Ctrl-C does: through the finally below, which stops the children
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seen = len(coordinator.rounds())
    control_port = free_port()
    tls = coordinator.tls
    services = Services(coordinator)
    try:
        superlink = services.start(
            [
                _bin("flower-superlink"),
                "--ssl-ca-certfile", str(tls / "ca.pem"),
                "--ssl-certfile", str(tls / "server.pem"),
                "--ssl-keyfile", str(tls / "server.key"),
                "--database", str(coordinator.database),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1",
                "--port", str(control_port),
            ],
            "superlink.log",
        )  # fmt: skip
        wait_for_port("127.0.0.1", control_port, STARTUP_S, lambda: superlink.poll() is None)
        write_flwr_config(coordinator, control_port)
        sites = register_sites(services)
        gateway = services.start(
            [
                sys.executable, "-m", "server.gateway",
                "--listen", address,
                "--upstream", f"127.0.0.1:{control_port}",
                "--cert", str(tls / "server.pem"),
                "--key", str(tls / "server.key"),
                "--ca", str(tls / "ca.pem"),
            ],
            "gateway.log",
        )  # fmt: skip
        wait_for_port(host.strip("[]"), int(port), STARTUP_S, lambda: gateway.poll() is None)
        on_event({"event": "listening", "address": address, "sites": sites})
        run_id = start_run(services, resume)
        on_event({"event": "run", "run_id": run_id})
        last: dict = {}
        next_status = time.monotonic() + status_every_s
        while True:
            entries = coordinator.rounds()
            for entry in entries[seen:]:
                on_event(entry)
                last = entry
            seen = len(entries)
            if last.get("event") == "finished":
                return last
            if superlink.poll() is not None or gateway.poll() is not None:
                raise InputError("the SuperLink or the gateway stopped; see state/*.log")
            if time.monotonic() > next_status:  # `flwr ls` costs a process start: not too often
                next_status = time.monotonic() + status_every_s
                status = run_status(services, run_id)
                if status.startswith("finished"):
                    time.sleep(poll_s)
                    if coordinator.rounds()[seen:]:
                        continue
                    raise InputError(f"the training run ended ({status}); see state/*.log")
            time.sleep(poll_s)
    finally:
        services.stop()
