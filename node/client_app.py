"""The Flower ClientApp a site runs: one round of local training on the site's cohort.

Thin, like Flower's ``quickstart-pytorch`` ``client_app.py`` beside its ``task.py``: each handler
decodes the message with the protocol's models (:mod:`policies.protocol`), calls one function
of :mod:`node.rounds`, and encodes the reply (the weights and aggregate metrics: sample count,
mean losses, seconds of local training). Images, maps and per-subject values never leave.

Node configuration (``flower-supernode --node-config``, set by ``lsdm-node join``): the fields of
:class:`policies.protocol.NodeConfig`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from pydantic import ValidationError

from node import rounds
from node.rounds import Refusal
from policies.protocol import NodeConfig, RoundConfig, SiteReply, problems

app = ClientApp()

__all__ = ["Refusal", "answer", "app", "encode_reply", "pack", "receive_bundle", "run_round"]


def pack(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as ONE Flower array (see ``server.wire.pack``: one object instead of
    hundreds of authenticated round trips)."""
    from lsdm.checkpoint import state_to_bytes

    return ArrayRecord({"state": Array(np.frombuffer(state_to_bytes(state), dtype=np.uint8))})


def unpack(record: ArrayRecord) -> dict[str, torch.Tensor]:
    from lsdm.checkpoint import state_from_bytes

    return state_from_bytes(record["state"].numpy().tobytes())


def decode_round(content: RecordDict) -> RoundConfig:
    """The round's settings; a round this site cannot read is refused, with the reason."""
    try:
        return RoundConfig.from_record(content.config_records["config"])
    except ValidationError as e:
        raise Refusal(f"malformed round settings: {problems(e)}") from None


def encode_reply(reply: SiteReply, weights: ArrayRecord | None = None) -> RecordDict:
    content = RecordDict({"metrics": MetricRecord(reply.to_record())})
    if weights is not None:
        content["arrays"] = weights
    return content


def run_round(content: RecordDict, node_config: Mapping) -> RecordDict:
    """Everything a site does for one round message; importable for tests without Flower."""
    config = decode_round(content)
    site = rounds.open_site(NodeConfig.from_record(node_config))
    rounds.check_round(config, site)
    arrays = content.array_records
    if config.phase == "calibrate":
        return encode_reply(rounds.calibration_round(site, config, unpack(arrays["arrays"])))
    if config.phase == "vqgan":
        weights, reply = rounds.vqgan_round(site, config, unpack(arrays["arrays"]))
    else:
        weights, reply = rounds.diffusion_round(
            site, config, unpack(arrays["arrays"]), unpack(arrays["vqgan"])
        )
    return encode_reply(reply, pack(weights))


def answer(msg: Message, context: Context, work: Callable[[RecordDict, Mapping], RecordDict]):
    """The reply to ``msg``: what ``work(content, node_config)`` returns, or its refusal reason."""
    try:
        content = work(msg.content, dict(context.node_config))
    except Refusal as refusal:
        content = RecordDict({"refusal": ConfigRecord({"reason": str(refusal)})})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return answer(msg, context, run_round)


def receive_bundle(content: RecordDict, node_config: Mapping) -> RecordDict:
    """The end of training: verify the generator bundle against the coordinator key pinned at
    join time and store it atomically; a bundle that fails the check is refused, not stored."""
    from lsdm.bundle import key_fingerprint, load_public_key, store_bundle
    from lsdm.errors import InputError

    node = NodeConfig.from_record(node_config)
    if node.coordinator_key is None:
        raise Refusal("no coordinator key pinned (lsdm-node join --coordinator-key): not stored")
    data = content.array_records["bundle"]["bytes"].numpy().tobytes()
    try:
        key = load_public_key(node.coordinator_key)
        manifest = store_bundle(data, key, node.bundle)
    except InputError as e:  # BundleError included: tampered, unsigned, another signer
        raise Refusal(f"generator bundle refused: {e}") from None
    stored = {
        "path": str(node.bundle),
        "sha256": hashlib.sha256(data).hexdigest(),
        "signer": key_fingerprint(key),
        "created_at": manifest.provenance.created_at,
    }
    return RecordDict({"stored": ConfigRecord(stored)})


@app.query()
def query(msg: Message, context: Context) -> Message:
    return answer(msg, context, receive_bundle)
