"""CSRF protection for the console's forms.

Signed in: every POST form carries the session's token (a random value stored with the session,
never in a URL) in a hidden field `csrf_token`; it is compared in constant time on every POST,
and a missing or different token is answered 403 before anything is done. Before sign-in (the
sign-in form itself, against login CSRF) a double-submit token is used: a random value in a
short-lived HttpOnly, SameSite=Strict cookie and the same value in the form. The session cookie
is SameSite=Strict too, so a cross-site request does not carry it in the first place.
"""
from __future__ import annotations

import hmac
import secrets

FIELD = "csrf_token"
LOGIN_COOKIE = "idv_console_login"
LOGIN_COOKIE_SECONDS = 3600


def new_token() -> str:
    return secrets.token_urlsafe(32)


def matches(expected: str | None, submitted: object) -> bool:
    if not expected or not isinstance(submitted, str) or not submitted:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), submitted.encode("utf-8"))
