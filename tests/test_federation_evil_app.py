"""A dishonest site for the federation tests (no tests in here).

Run as ``python -m tests.test_federation_evil_app`` in place of ``flwr-clientapp``: it is the
real guarded ClientApp, except that what it sends back is spoiled after honest training:

- VQ-GAN phase: its codebook, which no gradient trains, set to 1e30;
- calibration: a latent range a million wide, which would squash everyone's latent scale;
- diffusion phase: the largest sample count the policy allows, and its change of the EMA weights
  (the ones sampling uses, under no static norm bound) scaled up 30x.
"""

from __future__ import annotations

CODEBOOK = "autoencoder.quantizer.quantizer.embedding.weight"


def _spoil(run_round):
    def spoiled(content, node_config):
        from flwr.app import MetricRecord

        from node.client_app import pack, unpack
        from policies.federation import AggregationRules

        reply = run_round(content, node_config)
        metrics = dict(reply.metric_records["metrics"])
        if "arrays" not in reply.array_records:  # calibration: only metrics
            metrics["latent_low"] = [-1e6] * len(metrics["latent_low"])
            reply["metrics"] = MetricRecord(metrics)
            return reply
        state = unpack(reply.array_records["arrays"])
        if str(content.config_records["config"]["phase"]) == "vqgan":
            state[CODEBOOK] = state[CODEBOOK].clone().fill_(1e30)
        else:
            sent = unpack(content.array_records["arrays"])
            for key, value in state.items():
                if key.startswith("ema.") and value.is_floating_point():
                    state[key] = sent[key] + 30 * (value - sent[key])
            metrics["num_samples"] = AggregationRules().max_samples_per_site
            reply["metrics"] = MetricRecord(metrics)
        reply["arrays"] = pack(state)
        return reply

    return spoiled


if __name__ == "__main__":
    from node import app_guard, client_app

    client_app.run_round = _spoil(client_app.run_round)
    app_guard.main()
