"""The JWT secret's check: Tabby parses TABBY_WEBSERVER_JWT_TOKEN_SECRET as a UUID only at the first login, and
exits if it is not one, so the server checks it before starting Tabby and serves the reason instead."""

from __future__ import annotations

import re

from shared.serving.supervisor import JWT_ENV

# The forms Tabby's `Uuid::parse_str` (uuid crate) accepts: hyphenated, 32 hex digits, braced, urn.
_HYPHENATED = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_UUID = re.compile(rf"(?:urn:uuid:)?{_HYPHENATED}|\{{{_HYPHENATED}\}}|[0-9a-f]{{32}}", re.IGNORECASE)


def jwt_secret_problem(secret: str | None) -> str | None:
    """Why Tabby would reject this JWT secret (it parses it as a UUID at the first login, then exits), or None."""
    if secret is None or _UUID.fullmatch(secret):
        return None
    what = "is set but empty" if secret == "" else "is not a UUID"
    return (
        f"{JWT_ENV} {what}, so Tabby would exit at the first login; put a UUID in the Modal secret "
        "(`make rotate-jwt-secret`) and restart"
    )
