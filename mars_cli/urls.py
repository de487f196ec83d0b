"""URLs safe to show: what goes into records, cache keys and logs."""

from __future__ import annotations

import base64
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

SECRET_PARAMS = ("api_key", "apikey", "key", "token", "access_token", "secret", "password", "auth", "sig")


def split_credentials(url: str) -> tuple[str, str | None]:
    """(the URL without user:password@, a Basic Authorization header value or None)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    return urlunsplit(parts._replace(netloc=host)), f"Basic {token}"


def public_url(url: str | None) -> str | None:
    """`url` without credentials: no user:password@, secret-named query values masked."""
    if not url:
        return url
    url, _ = split_credentials(url)
    parts = urlsplit(url)
    if not parts.query:
        return url
    pairs = [(k, "***" if k.lower() in SECRET_PARAMS else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(pairs, safe="*")))
