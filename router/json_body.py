"""Accept a JSON body whatever its ``Content-Type`` says, as the OpenAI API does.

``curl -d '{...}'`` without ``-H 'Content-Type: application/json'`` sends
``application/x-www-form-urlencoded``; FastAPI then hands the body model raw bytes and answers
"Input should be a valid dictionary or object to extract fields from", which tells the user
nothing about the missing header. The API endpoints only ever take JSON, so the header of a
POST to ``/v1/`` is rewritten to ``application/json`` and the body is parsed as JSON: valid JSON
is served, anything else gets the usual 400 "invalid JSON" error.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

_JSON = b"application/json"


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == _JSON or media.endswith(b"+json")


class JsonBodyWithoutContentType:
    """Pure ASGI middleware: only the header list of matching requests changes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path", "").startswith("/v1/"):
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
            given = [v for k, v in scope.get("headers", []) if k.lower() == b"content-type"]
            if not given or not _is_json(given[0]):
                scope = {**scope, "headers": [*headers, (b"content-type", _JSON)]}
        await self.app(scope, receive, send)
