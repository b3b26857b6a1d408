"""The coordinator's public endpoint: TLS, and only the Fleet API (what SuperNodes use).

Flower 1.42 serves its Fleet, Control and Runtime APIs on one port, and the Control API (start
runs, register nodes) has no authentication of its own. So the SuperLink listens on loopback
only, and this gateway, on the public address, passes on ``POST /v1/fleet/*`` and answers every
other request with 403. Bodies and headers (the SuperNode's signed authentication headers
included) are passed through unchanged; the gateway talks to the SuperLink over TLS too.

Every refused request (the gateway's own 403, or an error status from the SuperLink: a site whose
key is not registered, a bad signature) is logged with the client's address, at most one line per
address per minute with a count of the ones in between, so that a site retrying forever shows up
in ``state/gateway.log`` without flooding it.

Run as ``python -m server.gateway --listen HOST:PORT --upstream 127.0.0.1:PORT --cert ... --key
... --ca ...`` (``lsdm-server serve`` starts it).
"""

from __future__ import annotations

import argparse
import logging
import ssl
import time
from collections.abc import Callable

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

FLEET_PREFIX = "/v1/fleet/"
HOP_BY_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "upgrade"}
REFUSAL_LOG_INTERVAL_S = 60.0
MAX_TRACKED_CLIENTS = 10_000

log = logging.getLogger("server.gateway")


class RefusalLog:
    """One log line per client address per ``interval_s`` for refused requests; the ones in
    between are counted and reported on the address's next line."""

    def __init__(
        self,
        interval_s: float = REFUSAL_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.interval_s, self.clock = interval_s, clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def refused(self, client: str, what: str) -> None:
        now = self.clock()
        last = self._last.get(client)
        if last is not None and now - last < self.interval_s:
            self._held[client] = self._held.get(client, 0) + 1
            return
        if len(self._last) >= MAX_TRACKED_CLIENTS:  # forget quiet addresses, not recent ones
            self._last = {c: t for c, t in self._last.items() if now - t < self.interval_s}
            self._held = {c: n for c, n in self._held.items() if c in self._last}
        held = self._held.pop(client, 0)
        self._last[client] = now
        more = f" (and {held} more refused since the last line)" if held else ""
        log.warning("refused %s: %s%s", client, what, more)


def _said(response: httpx.Response) -> str:
    """What the SuperLink said, on one short line."""
    text = " ".join(response.text.split())
    return text[:200] + ("..." if len(text) > 200 else "")


def make_app(upstream: str, ca: str, client: httpx.AsyncClient | None = None) -> Starlette:
    """The gateway app; ``client`` (default: TLS to ``upstream``, checked against ``ca``) is what
    it forwards Fleet requests with."""
    if client is None:
        context = ssl.create_default_context(cafile=ca)
        client = httpx.AsyncClient(base_url=f"https://{upstream}", verify=context, timeout=120.0)
    refusals = RefusalLog()

    async def forward(request: Request) -> Response:
        path = request.url.path
        who = request.client.host if request.client else "unknown"
        if request.method != "POST" or not path.startswith(FLEET_PREFIX) or ".." in path:
            refusals.refused(who, f"{request.method} {path[:200]}: not the Fleet API (403)")
            return PlainTextResponse("forbidden: only the Fleet API is served here\n", 403)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream_response = await client.post(path, content=await request.body(), headers=headers)
        if upstream_response.status_code >= 400:
            refusals.refused(
                who,
                f"{path}: the SuperLink answered {upstream_response.status_code} "
                f"({_said(upstream_response)})",
            )
        reply_headers = {
            k: v for k, v in upstream_response.headers.items() if k.lower() not in HOP_BY_HOP
        }
        reply_headers.pop("content-encoding", None)  # httpx has decoded the body already
        return Response(upstream_response.content, upstream_response.status_code, reply_headers)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="public HOST:PORT")
    parser.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host, port = split_address(args.listen)
    uvicorn.run(
        make_app(args.upstream, args.ca),
        host=host,
        port=port,
        ssl_certfile=args.cert,
        ssl_keyfile=args.key,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
