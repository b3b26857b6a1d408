"""The Flower ServerApp: the coordinator's training loop, run by the SuperLink.

Rounds 1..R1 train the VQ-GAN, then the sites agree the latent scale, then rounds R1+1..R1+R2
train the latent diffusion model (:mod:`server.rounds`). After each aggregated round the
federation's checkpoint is written atomically (:mod:`server.federation`) and a line appended to
``state/rounds.jsonl``; a round with too few valid updates is repeated, up to
``MAX_FAILED_ATTEMPTS`` times. A resumed run starts after the checkpoint's last completed round.
At the end the final models are exported and the signed bundle handed out (:mod:`server.handout`).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import DIFFUSION_PHASE, Federation
from server.handout import hand_out
from server.rounds import calibrate, train_round
from server.settings import Coordinator

app = ServerApp()

MAX_FAILED_ATTEMPTS = 3  # attempts at one round before the run gives up


@app.main()
def main(grid: Grid, context: Context) -> None:
    coordinator = Coordinator(Path(str(context.run_config["coordinator-dir"])))
    fed = Federation(coordinator, resume=bool(context.run_config.get("resume", False)))
    fed.log(
        {
            "event": "start",
            "after_round": fed.completed,
            "total_rounds": fed.total_rounds,
            "run_id": context.run_id,
        }
    )
    round_, failures = fed.completed + 1, 0
    while round_ <= fed.total_rounds:
        if fed.phase_of(round_) == DIFFUSION_PHASE and not fed.calibrated:
            fed.log(calibrate(grid, fed))
            fed.save()
        entry = train_round(grid, fed, round_)
        if entry["outcome"] != "aggregated":
            fed.log(entry)
            failures += 1
            if failures >= MAX_FAILED_ATTEMPTS:
                raise RuntimeError(f"round {round_} failed {failures} times: {entry['outcome']}")
            continue  # the round is repeated with whoever is there next time
        failures = 0
        fed.completed = round_
        fed.save()
        fed.log(entry)
        round_ += 1
    fed.export()
    fed.log(hand_out(grid, fed))
    fed.log({"event": "finished", "rounds": fed.total_rounds})
