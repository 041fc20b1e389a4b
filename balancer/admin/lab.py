"""The network lab's admin routes: /api/connections, /api/connections/{id}, /api/tcp."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from balancer.lab.table import ConnTable

TCP_TIMEOUT = 5.0  # a sock_diag dump that takes longer is answered 503


class LabView(Protocol):
    """What the routes need (balancer.io.lab.Lab is one)."""

    table: ConnTable

    async def connections_async(self, closed: bool = False) -> dict[str, Any]: ...
    async def connection_async(self, cid: int) -> dict[str, Any] | None: ...
    def tcp(self) -> Awaitable[dict[str, Any]]: ...


def _json(data: Any) -> web.Response:
    return web.Response(
        text=json.dumps(data, separators=(",", ":"), default=str), content_type="application/json"
    )


def routes(lab: LabView, error: Callable[[int, str], Exception]) -> list[web.RouteDef]:
    async def connections(request: web.Request) -> web.Response:
        closed = request.query.get("closed", "0")
        if closed not in ("0", "1"):
            raise error(400, "closed must be 0 or 1")
        return _json(await lab.connections_async(closed=closed == "1"))

    async def connection(request: web.Request) -> web.Response:
        raw = request.match_info["id"]
        if not raw.isdigit() or len(raw) > 18:
            raise error(400, "connection id must be a number")
        view = await lab.connection_async(int(raw))
        if view is None:
            raise error(404, f"no connection {raw} (open or recently closed)")
        return _json(view)

    async def tcp(request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(TCP_TIMEOUT):
                return _json(await lab.tcp())
        except TimeoutError:
            raise error(503, "sock_diag did not answer in time") from None
        except OSError as exc:
            raise error(503, f"sock_diag unavailable: {exc.strerror or exc}") from None

    return [
        web.get("/api/connections", connections),
        web.get("/api/connections/{id}", connection),
        web.get("/api/tcp", tcp),
    ]
