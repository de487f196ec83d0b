"""URLs safe to show: what goes into records, cache keys, settings files and logs.

Two forms, one set of rules:
- `public_url(url)`: a URL as an identity (records, cache keys): no user:password@ at all,
  secret-named query values replaced by ***.
- `redact(text)`: any text (a log line, an error, a setting's value) with every URL in it
  masked in place: `user:password@` becomes `user:***@`, a bare `token@` becomes `***@`
  (however many `@` the password holds), and secret-named query values become ***.

A query parameter is secret when its name says so: `key`, `token`, `secret`, `password`,
`signature`, `sig`, `auth`, `credential` (`api_key`, `access_token`, `X-Amz-Signature`…).
`join(base, path)` adds a route to a base URL in front of its query, never after it;
`split_query` takes the query off for clients that join routes as text.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import unquote, urlsplit, urlunsplit

# scheme://userinfo@ — the userinfo runs to the LAST @ before the host's end (a password may
# hold @); quotes and whitespace end it, so an e-mail address later in a line is not touched.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^/?#\s\"'<>]*)@")
_SECRET_NAME = r"[\w.\-]*(?:key|token|secret|passw(?:or)?d|pwd|signature|credentials?)|sig|auth|authorization"
_SECRET_QUERY = re.compile(rf"(?i)([?&;](?:{_SECRET_NAME})=)[^&#\s\"'<>]*")


def _mask_userinfo(m: re.Match) -> str:
    user, sep, _ = m.group(2).partition(":")
    return f"{m.group(1)}{user}:***@" if sep else f"{m.group(1)}***@"


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it masked (see the module docstring)."""
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(_mask_userinfo, text))


def redact_value(value):
    """A JSON-like value (settings, records) with every string in it redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact_value(v) for v in value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    return value


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
    return _SECRET_QUERY.sub(r"\1***", url)


def split_query(url: str) -> tuple[str, dict[str, str]]:
    """(the URL without its query, the query's parameters): for clients that append routes
    to a base URL as text (the OpenAI client) and take the query apart."""
    from urllib.parse import parse_qsl

    parts = urlsplit(url)
    if not parts.query:
        return url, {}
    return urlunsplit(parts._replace(query="")), dict(parse_qsl(parts.query, keep_blank_values=True))


def join(base: str, path: str) -> str:
    """`base` with `path` appended to its path; the query and fragment stay at the end."""
    parts = urlsplit(base)
    route = parts.path.rstrip("/") + "/" + path.lstrip("/")
    return urlunsplit(parts._replace(path=route))
