"""The coordinator killed after a round (SIGKILL of it and all its processes, as a crash) and
restarted with ``--resume``: training continues at the next round; no completed round is lost
or repeated; the sites reconnect by themselves."""

from __future__ import annotations

from lsdm.checkpoint import read_metadata
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


def test_coordinator_killed_after_a_round_resumes_at_the_next(tmp_path, processes):
    coordinator = make_coordinator(tmp_path, {"vqgan": 1, "diffusion": 1}, min_sites=2)
    sites = [make_site(tmp_path, name, 2, seed, coordinator) for name, seed in [("a", 4), ("b", 5)]]
    port = free_port()
    address = f"127.0.0.1:{port}"
    server = serve(processes, coordinator, address)
    wait_for_port(port)
    for site in sites:
        join(processes, site, address, coordinator / "tls" / "ca.pem")

    def completed() -> list[int]:
        return [e["round"] for e in rounds(coordinator) if e.get("outcome") == "aggregated"]

    wait_until(lambda: completed() == [1], 300, "round 1", server)
    assert not (coordinator / "state" / "vqgan.safetensors").exists()
    processes.kill(server)
    checkpoint = coordinator / "state" / "federation.safetensors"
    assert read_metadata(checkpoint)["completed_round"] == 1

    resumed = serve(processes, coordinator, address, resume=True)
    wait_until(
        lambda: any(e["event"] == "finished" for e in rounds(coordinator)),
        420,
        "the resumed federation to finish",
        resumed,
    )
    assert resumed.wait(timeout=60) == 0
    assert completed() == [1, 2]  # phase 1 before the crash, phase 2 after it
    starts = [e for e in rounds(coordinator) if e["event"] == "start"]
    assert [s["after_round"] for s in starts] == [0, 1]
    assert read_metadata(checkpoint)["completed_round"] == 2
    assert (coordinator / "state" / "ldm.safetensors").is_file()
