"""A site killed in the middle of a round (SIGKILL of its SuperNode and the ClientApp that is
training): the round completes with the other sites, since the policy's minimum is still met,
and the site, started again with the same key and work folder, takes part in the next rounds."""

from __future__ import annotations

import contextlib
from pathlib import Path

from server.serve import descendants
from tests.test_federation import (
    free_port,
    join,
    make_coordinator,
    make_site,
    rounds,
    serve,
    wait_for_port,
    wait_until,
)


def training(join_process) -> bool:
    """Whether the site is inside a round: its SuperNode runs a ClientApp (``node.app_guard``)."""
    for pid in descendants(join_process.pid):
        with contextlib.suppress(OSError):
            if b"node.app_guard" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
    return False


def test_site_killed_mid_round_the_round_completes_and_the_site_rejoins(tmp_path, processes):
    coordinator = make_coordinator(
        tmp_path, {"vqgan": 2, "diffusion": 1}, min_sites=2, all_sites_grace_s=240
    )
    sites = {name: make_site(tmp_path, name, 2, seed, coordinator)
             for name, seed in [("a", 4), ("b", 5), ("c", 6)]}  # fmt: skip
    port = free_port()
    address = f"127.0.0.1:{port}"
    ca = coordinator / "tls" / "ca.pem"
    server = serve(processes, coordinator, address)
    wait_for_port(port)
    joined = {name: join(processes, site, address, ca) for name, site in sites.items()}

    wait_until(lambda: training(joined["c"]), 300, "site c to start its round-1 training", server)
    processes.kill(joined["c"])

    def aggregated() -> dict[int, dict]:
        return {e["round"]: e for e in rounds(coordinator) if e.get("outcome") == "aggregated"}

    wait_until(lambda: 1 in aggregated(), 300, "round 1 without site c", server)
    first = aggregated()[1]
    assert set(first["accepted"]) == {"a", "b"}
    assert first["rejected"]["c"].startswith("site failed")

    join(processes, sites["c"], address, ca)  # the same key and work folder: the site rejoins
    wait_until(
        lambda: any(e["event"] == "finished" for e in rounds(coordinator)),
        480,
        "the federation to finish",
        server,
    )
    assert server.wait(timeout=60) == 0
    later = aggregated()
    assert [e["round"] for e in rounds(coordinator) if e["event"] == "round"] == [1, 2, 3]
    assert set(later[2]["accepted"]) == set(later[3]["accepted"]) == {"a", "b", "c"}
    assert (coordinator / "state" / "ldm.safetensors").is_file()
