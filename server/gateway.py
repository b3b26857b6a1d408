"""The coordinator's public endpoint: TLS, and only the Fleet API (what SuperNodes use).

Flower 1.42 serves its Fleet, Control and Runtime APIs on one port, and the Control API (start
runs, register nodes) has no authentication of its own. So the SuperLink listens on loopback
only, and this gateway, on the public address, passes on ``POST /v1/fleet/*`` and answers every
other request with 403. Bodies and headers (the SuperNode's signed authentication headers
included) are passed through unchanged; the gateway talks to the SuperLink over TLS too.

Run as ``python -m server.gateway --listen HOST:PORT --upstream 127.0.0.1:PORT --cert ... --key
... --ca ...`` (``lsdm-server serve`` starts it).
"""

from __future__ import annotations

import argparse
import ssl

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

FLEET_PREFIX = "/v1/fleet/"
HOP_BY_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "upgrade"}


def make_app(upstream: str, ca: str) -> Starlette:
    context = ssl.create_default_context(cafile=ca)
    client = httpx.AsyncClient(base_url=f"https://{upstream}", verify=context, timeout=120.0)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not path.startswith(FLEET_PREFIX) or ".." in path:
            return PlainTextResponse("forbidden: only the Fleet API is served here\n", 403)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream_response = await client.post(path, content=await request.body(), headers=headers)
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
