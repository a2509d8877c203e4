"""The optional API key (option.api_key): every request except /ping must carry `Authorization: Bearer <key>`.

Off by default: SageMaker authenticates callers itself (SigV4 at the endpoint) and calls the container
without such a header. A deployment that exposes the port elsewhere sets a key. /ping stays open for load
balancers' and orchestrators' health checks. A pure ASGI middleware (not Starlette's BaseHTTPMiddleware),
so streaming responses and disconnect detection, which read `receive` directly, are untouched.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi.responses import JSONResponse

from entrypoint.protocol.errors import ErrorFamily, Unauthorized, error_body

#: paths answered without the key
OPEN_PATHS = frozenset({"/ping"})


class ApiKeyMiddleware:
    def __init__(self, app: Any, key: str):
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = Unauthorized("this server requires an API key: send the header \"Authorization: Bearer <key>\" "
                             "with the key configured as option.api_key")
        response = JSONResponse(error_body(error, ErrorFamily.for_path(scope["path"])), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _authorized(self, scope: dict[str, Any]) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                # compare_digest: the time taken does not reveal how much of a guessed key was right
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False
