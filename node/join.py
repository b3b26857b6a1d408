"""``lsdm-node join``: run a Flower SuperNode for this site.

The SuperNode connects out to the coordinator over TLS (the coordinator's CA only), proves the
site's identity with its key, and runs the installed ClientApp (:mod:`node.client_app`) behind
the app guard (:mod:`node.app_guard`). It retries the connection by itself, so a coordinator
restart is ridden out.

The coordinator's public signing key is pinned at the first join: copied into the work folder,
and a later join with another key is refused. When training ends the coordinator hands out the
signed generator bundle; the site stores it (``WORKDIR/generator.lsdm``) only if its signature
verifies against the pinned key.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lsdm.loopback import free_port
from node.errors import UserError
from policies.protocol import NodeConfig


@dataclass(frozen=True)
class JoinSpec:
    server: str
    ca: Path
    key: Path
    cohort: Path
    policy: str
    workdir: Path
    threads: int = 1
    runtime_port: int | None = None
    coordinator_key: Path | None = None  # signing.pub.pem; without one, bundles are refused


PINNED_KEY = "coordinator.pub.pem"


def check_join(spec: JoinSpec) -> None:
    """Everything a site can check before it connects; raises a user error (:class:`InputError`)."""
    from lsdm.data import open_cohort
    from policies import load_site_policy

    if ":" not in spec.server:
        raise UserError(f"--server must be HOST:PORT, not {spec.server!r}")
    for path, what in ((spec.ca, "CA certificate"), (spec.key, "site key")):
        if not Path(path).is_file():
            raise UserError(f"no such {what}: {path}")
    from cryptography import x509

    try:  # the SuperNode would otherwise retry a TLS handshake that can never succeed, forever
        x509.load_pem_x509_certificate(Path(spec.ca).read_bytes())
    except ValueError:
        raise UserError(
            f"not a PEM certificate: {spec.ca} (--ca wants the coordinator's ca.pem)"
        ) from None
    open_cohort(spec.cohort)
    if spec.coordinator_key is not None:
        pin_coordinator_key(spec, dry_run=True)
    policy = load_site_policy(spec.policy)
    if policy.dp.enabled:
        from node.ledger import Ledger, LedgerError

        try:  # an unreadable ledger would refuse every round: say so now
            Ledger.of_cohort(spec.cohort)
        except LedgerError as e:
            raise UserError(str(e)) from None


def pin_coordinator_key(spec: JoinSpec, dry_run: bool = False) -> Path:
    """Copy the coordinator's signing key into the work folder (once); refuse another key later.
    Returns the pinned copy's path."""
    from lsdm.bundle import load_public_key
    from lsdm.errors import InputError

    try:
        load_public_key(Path(spec.coordinator_key))
    except InputError as e:
        raise UserError(f"--coordinator-key: {e}") from None
    given = Path(spec.coordinator_key).read_bytes()
    pinned = Path(spec.workdir).resolve() / PINNED_KEY
    if pinned.is_file():
        if pinned.read_bytes() != given:
            raise UserError(
                f"{pinned} pins another coordinator key than {spec.coordinator_key}: this work "
                "folder belongs to another federation (use another --workdir)"
            )
    elif not dry_run:
        from lsdm.atomic import atomic_path

        pinned.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(pinned) as tmp:
            tmp.write_bytes(given)
    return pinned


def supernode_command(spec: JoinSpec) -> tuple[list[str], dict[str, str]]:
    """The ``flower-supernode`` command line and environment for ``spec``."""
    from lsdm.bundle import BUNDLE_NAME

    workdir = Path(spec.workdir).resolve()
    shim = workdir / "bin"
    shim.mkdir(parents=True, exist_ok=True)
    script = shim / "flwr-clientapp"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m node.app_guard "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    pinned = spec.coordinator_key is not None
    node_config = NodeConfig(
        cohort=Path(spec.cohort).resolve(),
        policy=str(spec.policy),
        workdir=workdir / "rounds",
        threads=spec.threads,
        coordinator_key=workdir / PINNED_KEY if pinned else None,
        bundle=workdir / BUNDLE_NAME if pinned else None,
    )
    supernode = shutil.which("flower-supernode", path=str(Path(sys.executable).parent))
    command = [
        supernode or "flower-supernode",
        "--superlink",
        spec.server,
        "--root-certificates",
        str(Path(spec.ca).resolve()),
        "--auth-supernode-private-key",
        str(Path(spec.key).resolve()),
        "--node-config",
        node_config.to_flag(),
        "--port",
        str(spec.runtime_port or free_port()),
    ]
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(shim), str(Path(sys.executable).parent), env["PATH"]])
    env["FLWR_HOME"] = str(workdir / "flwr-home")
    return command, env


def join(spec: JoinSpec) -> int:
    """Run the SuperNode until it stops; returns its exit status."""
    check_join(spec)
    if spec.coordinator_key is not None:
        pin_coordinator_key(spec)
    command, env = supernode_command(spec)
    process = subprocess.Popen(command, env=env)
    # stopping join stops the SuperNode (which stops its own children)
    signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        return process.wait(timeout=30)
