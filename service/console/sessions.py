"""Console sessions, stored server-side in `console_sessions` (migration 0002).

Why server-side rather than a signed cookie: sign-out and key revocation take effect at once
(a signed cookie stays valid until it expires unless we keep a deny-list, i.e. server state
anyway), and there is no extra signing secret to configure and rotate. The cookie holds only a
random 256-bit session id; the table stores its SHA-256, so a read of the table does not hand
out live sessions. A session ends on sign-out, after IDV_CONSOLE_SESSION_MINUTES without a
request (sliding, refreshed at most once a minute), 12 hours after sign-in at the latest, or as
soon as its key is revoked. The per-session CSRF token lives in the same row.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import Engine, delete, select, update

from service.records import keys
from service.records.audit import utc
from service.records.engine import read_session, write_session
from service.records.tables import ApiKey, ConsoleSession

COOKIE = "idv_console"
ABSOLUTE_LIFETIME = timedelta(hours=12)
TOUCH_EVERY = timedelta(seconds=60)


@dataclass
class Principal:
    """Who is signed in (never the key itself)."""
    session_hash: str
    key_id: int
    role: str
    name: str
    prefix: str
    csrf_token: str
    expires_at: datetime


def _digest(cookie_value: str) -> str:
    return hashlib.sha256(cookie_value.encode("utf-8")).hexdigest()


def may_sign_in(key: ApiKey) -> bool:
    """Operators and admins (the roles that may read the audit trail); never kiosks."""
    return keys.allowed(key.role, "audit")


def create(engine: Engine, key: ApiKey, idle_minutes: int, now: datetime | None = None) -> str:
    """A new session for `key`; returns the cookie value. Expired sessions are swept here."""
    if not may_sign_in(key):
        raise PermissionError(f"{keys.a_role_key(key.role)} may not sign in to the console")
    now = now or datetime.now(timezone.utc)
    value = secrets.token_urlsafe(32)
    row = ConsoleSession(id_hash=_digest(value), key_id=key.id, csrf_token=secrets.token_urlsafe(32),
                         created_at=now, last_seen_at=now,
                         expires_at=min(now + timedelta(minutes=idle_minutes), now + ABSOLUTE_LIFETIME))
    with write_session(engine) as s:
        s.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now))
        s.add(row)
    return value


def lookup(engine: Engine, cookie_value: str | None, idle_minutes: int, now: datetime | None = None) -> Principal | None:
    """The live session for this cookie (extended when due), or None."""
    if not cookie_value or len(cookie_value) > 128:
        return None
    now = now or datetime.now(timezone.utc)
    digest = _digest(cookie_value)
    with read_session(engine) as s:
        found = s.execute(select(ConsoleSession, ApiKey).join(ApiKey, ApiKey.id == ConsoleSession.key_id)
                          .where(ConsoleSession.id_hash == digest)).first()
    if found is None:
        return None
    sess, key = found
    if utc(sess.expires_at) <= now or key.revoked_at is not None or not may_sign_in(key):
        return None
    expires = utc(sess.expires_at)
    if now - utc(sess.last_seen_at) >= TOUCH_EVERY:
        expires = min(now + timedelta(minutes=idle_minutes), utc(sess.created_at) + ABSOLUTE_LIFETIME)
        with write_session(engine) as s:
            s.execute(update(ConsoleSession).where(ConsoleSession.id_hash == digest)
                      .values(last_seen_at=now, expires_at=expires))
    return Principal(digest, key.id, key.role, key.name, key.prefix, sess.csrf_token, expires)


def end(engine: Engine, session_hash: str) -> None:
    with write_session(engine) as s:
        s.execute(delete(ConsoleSession).where(ConsoleSession.id_hash == session_hash))
