"""Benchmark only: a site whose local training is a fixed wait (``bench_federation.py
--reference-size``), so that a round of a model too big to train here still measures the
federation's own cost (transfers, checks, averaging).

The installed ClientApp with one change: its training handler answers with
:func:`fixed_wait_round` (the wait in seconds from ``LSDM_BENCH_FIXED_WAIT_S``), which sends the
received weights back unchanged. Run as ``python -m fixed_wait_site`` (with this folder on
``PYTHONPATH``) in place of ``flwr-clientapp``; :func:`use_fixed_wait` puts it there. It runs
behind the same app guard, and, like it, imports the app (torch and all) only after Flower's
start-up handshake, which allows a process a few seconds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

WAIT_ENV = "LSDM_BENCH_FIXED_WAIT_S"


def fixed_wait_round(content, node_config):
    """Check the round as a site would, wait, and reply with the weights received."""
    from lsdm.config import preset
    from node import rounds
    from node.client_app import decode_round, encode_reply
    from policies.protocol import NodeConfig, SiteReply

    config = decode_round(content)
    site = rounds.open_site(NodeConfig.from_record(node_config))
    rounds.check_round(config, site)
    wait_s = float(os.environ[WAIT_ENV])
    time.sleep(wait_s)
    reply = SiteReply(num_samples=len(site.cohort.pairs), train_seconds=wait_s)
    if config.phase == "calibrate":
        channels = preset(config.preset).vqgan.embedding_dim
        range_ = {"latent_low": [-1.0] * channels, "latent_high": [1.0] * channels}
        return encode_reply(reply.model_copy(update=range_))
    return encode_reply(reply, content.array_records["arrays"])


def fixed_wait_app():
    """The installed ClientApp's handlers, training replaced by :func:`fixed_wait_round`."""
    from flwr.clientapp import ClientApp

    from node import client_app

    app = ClientApp()

    @app.train()
    def train(msg, context):
        return client_app.answer(msg, context, fixed_wait_round)

    app.query()(client_app.query)
    return app


def use_fixed_wait(shim: Path, python: str) -> None:
    """Make the site whose ``flwr-clientapp`` shim (written by ``lsdm-node join``) is ``shim``
    run this app instead."""
    here = Path(__file__).resolve().parent
    shim.write_text(f'#!/bin/sh\nexec env PYTHONPATH="{here}" "{python}" -m fixed_wait_site "$@"\n')


def _main() -> None:
    from node import app_guard

    guarded = app_guard.guarded_load_client_app_fn

    def load_fixed_wait_app(*args, **kwargs):
        check_and_load = guarded(*args, **kwargs)

        def load(*fab, **fab_kwargs):
            # the coordinator's app bundle is checked as at any site
            check_and_load(*fab, **fab_kwargs)
            return fixed_wait_app()

        return load

    app_guard.guarded_load_client_app_fn = load_fixed_wait_app
    app_guard.main()


if __name__ == "__main__":
    _main()
