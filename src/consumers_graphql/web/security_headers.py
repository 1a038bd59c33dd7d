"""Headers every response carries, whatever answered it (a route, a refusal, a 500): the
browser must not sniff types, frame the service, send a referrer, or keep a copy of an
answer that may hold personal data."""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_RAW_HEADERS = [(name.lower().encode(), value.encode()) for name, value in HEADERS.items()]
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)
_SCRIPT_SRC = re.compile(r'<script[^>]*\ssrc="([^"]+)"')
_STYLESHEET = re.compile(r'<link[^>]*\srel="stylesheet"[^>]*\shref="([^"]+)"'
                         r'|<link[^>]*\shref="([^"]+)"[^>]*\srel="stylesheet"')


def _sources(urls: list[str]) -> list[str]:
    """A CDN's file by its full URL; this origin's as 'self' (a path is no CSP source)."""
    sources = ["'self'" if url.startswith("/") and not url.startswith("//") else url
               for url in urls]
    return list(dict.fromkeys(sources))


def page_policy(html: str) -> str:
    """A Content-Security-Policy for a page: exactly the scripts and stylesheets it names
    (this origin's as 'self'), its own inline scripts by hash, requests to this origin only,
    never framed."""
    hashes = [
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
        for s in _INLINE_SCRIPT.findall(html)
    ]
    scripts = " ".join([*_sources(_SCRIPT_SRC.findall(html)), *hashes])
    stylesheets = [a or b for a, b in _STYLESHEET.findall(html)]
    # GraphiQL's editor and Swagger UI add <style> elements as they run.
    styles = " ".join([*_sources(stylesheets), "'unsafe-inline'"])
    return (f"default-src 'none'; script-src {scripts}; style-src {styles}; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def add_security_headers(start: Message) -> None:
    """HEADERS, but those the response set itself, added to an `http.response.start`."""
    raw = start["headers"] = list(start.get("headers", ()))
    present = {name.lower() for name, _ in raw}
    raw.extend(header for header in _RAW_HEADERS if header[0] not in present)


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                add_security_headers(message)
            await send(message)

        await self.app(scope, receive, send_with_headers)
