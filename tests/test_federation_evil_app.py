"""A dishonest site for the federation tests (no tests in here).

Run as ``python -m tests.test_federation_evil_app`` in place of ``flwr-clientapp``: it is the
real guarded ClientApp, except that the weights it sends back are spoiled after honest training:
NaN in the VQ-GAN phase, a change far beyond any sane norm in the diffusion phase.
"""

from __future__ import annotations


def _spoil(run_round):
    def spoiled(content, node_config):
        from node.client_app import pack, unpack

        reply = run_round(content, node_config)
        if "arrays" not in reply.array_records:
            return reply  # calibration: only metrics
        state = unpack(reply.array_records["arrays"])
        floats = [k for k, v in state.items() if v.is_floating_point()]
        if str(content.config_records["config"]["phase"]) == "vqgan":
            state[floats[0]] = state[floats[0]].clone().fill_(float("nan"))
        else:
            for key in floats:
                state[key] = state[key] + 1000.0
        reply["arrays"] = pack(state)
        return reply

    return spoiled


if __name__ == "__main__":
    from node import app_guard, client_app

    client_app.run_round = _spoil(client_app.run_round)
    app_guard.main()
