"""``lsdm-node``: what a site operator runs. Thin: parse, load the policy and keys, call, print.

The commands register themselves on :data:`node.cli_common.app` when their modules load.
"""

from __future__ import annotations

from node import cli_data, cli_federation  # noqa: F401  (importing registers their commands)
from node.cli_common import app

__all__ = ["app"]
