"""Messages between the coordinator and its sites: the weights as one Flower array, waiting for
the sites to connect, sending a message to every one of them and reading their replies (a
failed or refusing site is named with its reason, never dropped silently)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from pydantic import ValidationError

from lsdm.checkpoint import state_from_bytes, state_to_bytes
from policies.protocol import SiteReply, problems
from server.federation import Federation


def pack(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as ONE Flower array. Flower 1.42 moves every array of a message as separate
    objects, each its own authenticated request through the gateway; a UNet's hundreds of
    tensors then cost a minute of round trips per round, one blob costs a few requests."""
    return ArrayRecord({"state": Array(np.frombuffer(state_to_bytes(state), dtype=np.uint8))})


def unpack(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return state_from_bytes(record["state"].numpy().tobytes())


def payload_bytes(record: ArrayRecord) -> int:
    """Tensor bytes of a record (what travels, before Flower's framing)."""
    return sum(len(array.data) for array in record.values())


def node_names(grid: Grid) -> dict[int, str]:
    return {node.node_id: node.name or str(node.node_id) for node in grid.get_nodes()}


def wait_for_sites(grid: Grid, fed: Federation) -> list[int]:
    """The connected sites, once every registered site is there, or once ``min_sites`` are and
    the grace period for the others has passed."""
    registered = len(fed.coordinator.registered_sites())
    started = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        waited = time.monotonic() - started
        if len(nodes) >= fed.policy.min_sites and (
            len(nodes) >= registered or waited > fed.settings.all_sites_grace_s
        ):
            return nodes
        if waited > fed.settings.wait_for_sites_s:
            raise RuntimeError(
                f"only {len(nodes)} of {fed.policy.min_sites} sites connected in time"
            )
        time.sleep(1.0)


def exchange(
    grid: Grid, fed: Federation, content: RecordDict, round_: int, message_type: str = "train"
) -> Iterator[tuple[str, Message | str]]:
    """Send ``content`` to every connected site; yield (site name, reply or error text)."""
    nodes = wait_for_sites(grid, fed)
    names = node_names(grid)
    messages = [
        Message(content=content, dst_node_id=n, message_type=message_type, group_id=str(round_))
        for n in nodes
    ]
    replies = grid.send_and_receive(messages, timeout=fed.settings.round_timeout_s)
    # A reply is matched to its site by the message it answers: when a site dies, the SuperLink
    # itself answers for it ("node unavailable"), with its own id as the sender.
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    for reply in replies:
        node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        site = names.get(node, str(node))
        if reply.has_error():
            yield site, f"site failed: {reply.error.reason}"
        elif "refusal" in reply.content.config_records:
            yield site, f"site refused: {reply.content.config_records['refusal']['reason']}"
        else:
            yield site, reply


def decode_reply(content: RecordDict) -> SiteReply | str:
    """A round's reply as a :class:`SiteReply`, or why it cannot be one: a reply that does not
    decode is the site's fault, one rejected update, and the round goes on."""
    if "metrics" not in content.metric_records:
        return "rejected: malformed reply: no metrics"
    try:
        return SiteReply.from_record(content.metric_records["metrics"])
    except ValidationError as e:
        return f"rejected: malformed reply: {problems(e)}"


def site_replies(
    grid: Grid, fed: Federation, content: RecordDict, round_: int
) -> Iterator[tuple[str, tuple[SiteReply, Message] | str]]:
    """:func:`exchange` for a round: each reply with its decoding, or why it has none."""
    for site, reply in exchange(grid, fed, content, round_):
        decoded = reply if isinstance(reply, str) else decode_reply(reply.content)
        yield site, decoded if isinstance(decoded, str) else (decoded, reply)
