"""The process's shared HTTP clients for Mana: pooled, bounded in time, and holding no credential.

One client per service serves every persona of the process, so it must never remember anything
a server sets: httpx keeps a cookie jar per client, and the first persona's Better Auth session
cookie would otherwise travel with every later persona's request (issue 13: refused at sign-in
by Better Auth's origin check, and one persona's session in another's request). Credentials go
on each request explicitly, from the persona's own session (runner/session.py).
"""

from __future__ import annotations

import http.cookiejar
import urllib.request
from typing import Any

import httpx

TIMEOUT = httpx.Timeout(30.0, connect=10.0)


class NoCookies(http.cookiejar.CookieJar):
    """A jar that stores nothing: Set-Cookie answers are dropped, so no request gets a cookie from it.

    A jar subclass rather than a refusing policy: httpx's `client.cookies = …` setter copies the
    jar's cookies into a new default jar and loses its policy (httpx 0.28), while a jar passed to
    the constructor is kept as it is.
    """

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None

    def extract_cookies(self, response: Any, request: urllib.request.Request) -> None:
        return None


def shared_client(timeout: httpx.Timeout = TIMEOUT) -> httpx.AsyncClient:
    """A client every persona may share: it keeps connections, never cookies."""
    return httpx.AsyncClient(timeout=timeout, cookies=NoCookies())
