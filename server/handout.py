"""The end of training: the signed generator bundle, handed out to every connected site."""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp import Grid

from lsdm.bundle import BUNDLE_NAME
from server.exchange import exchange
from server.federation import Federation
from server.publish import publish


def hand_out(grid: Grid, fed: Federation) -> dict:
    """Sign the generator bundle of the final models (``state/generator.lsdm``) and send it to
    every connected site; each stores it only if the signature verifies against the coordinator
    key it pinned when it joined. The log line says which sites stored it (and its SHA-256)."""
    path = fed.coordinator.state / BUNDLE_NAME
    publish(fed.coordinator.root, path)
    data = path.read_bytes()
    content = RecordDict(
        {"bundle": ArrayRecord({"bytes": Array(np.frombuffer(data, dtype=np.uint8))})}
    )
    stored, refused = [], {}
    for site, reply in exchange(grid, fed, content, fed.total_rounds, message_type="query"):
        if isinstance(reply, str):
            refused[site] = reply
        else:
            stored.append(site)
    return {
        "event": "handed_out",
        "bundle": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "stored": sorted(stored),
        "refused": refused,
    }
