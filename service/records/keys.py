"""API keys: creation, hashing, lookup, roles; `idverify keys create|list|revoke`.

A key is 32 random bytes (urlsafe base64) behind a short `idv_` tag. What is stored is
HMAC-SHA256(IDV_KEY_PEPPER, SHA-256 hex of the key): a copy of the table alone is no use for
testing guesses (short bootstrap keys included) without the pepper, which lives only in the
service's environment. Migration 0003 turned the SHA-256 digests stored before into these in
place; changing the pepper invalidates every key. Without a pepper (the embedded default) the
HMAC key is empty and the service warns at start-up. A request's key is hashed and looked up
by that digest (an indexed equality), then the digests are compared in constant time. The
first characters of a generated key are kept as a non-secret prefix so operators can tell keys
apart; a bootstrap key (IDV_BOOTSTRAP_ADMIN_KEY, chosen by a person, with no `idv_` tag) is
listed under a random `boot-` identifier instead, none of its characters. The last active
admin key cannot be revoked through the API or the CLI.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from datetime import datetime, timezone

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from service.records.engine import read_session, write_session
from service.records.tables import ApiKey

ROLES = ("kiosk", "operator", "admin")
# what each permission needs; admin may do everything
PERMISSIONS = {
    "verify": {"kiosk", "admin"},
    "audit": {"operator", "admin"},
    "keys": {"admin"},
}
KEY_TAG = "idv_"
PREFIX_LEN = 12
BOOTSTRAP_TAG = "boot-"
# what each permission lets a key do, in words (403 answers)
PERMISSION_WORDS = {"verify": "call /verify", "audit": "read the audit trail", "keys": "manage API keys"}
MIN_BOOTSTRAP_LEN = 32
MAX_KEY_ID = 2**31 - 1   # api_keys.id is an INTEGER
DEVICE_ID_MAX = 128      # as /verify's device_id
log = logging.getLogger("idverify.keys")


def generate_key() -> str:
    return KEY_TAG + secrets.token_urlsafe(32)


class LastAdminKey(ValueError):
    """Revoking this key would leave no active admin key."""


def pepper_hash(pepper: str | None, sha256_hex: str) -> str:
    """HMAC-SHA256 under the pepper of a key's SHA-256 hex (what migration 0003 computes)."""
    return hmac.new((pepper or "").encode("utf-8"), sha256_hex.encode("ascii"), hashlib.sha256).hexdigest()


def hash_key(plaintext: str, pepper: str | None = None) -> str:
    return pepper_hash(pepper, hashlib.sha256(plaintext.encode("utf-8")).hexdigest())


def display_prefix(plaintext: str) -> str:
    """The non-secret part shown in listings: never more than a quarter of the key."""
    return plaintext[:min(PREFIX_LEN, len(plaintext) // 4)]


def bootstrap_label() -> str:
    """The listed identifier of a bootstrap key: random, so it tells nothing about the key."""
    return BOOTSTRAP_TAG + secrets.token_hex(4)


def allowed(role: str, permission: str) -> bool:
    return role in PERMISSIONS[permission]


def a_role_key(role: str) -> str:
    """'a kiosk key', 'an operator key', 'an admin key'."""
    return f"{'an' if role[:1].lower() in 'aeiou' else 'a'} {role} key"


def refusal(role: str, permission: str) -> str:
    """The 403 message: 'an operator key may not manage API keys'."""
    return f"{a_role_key(role)} may not {PERMISSION_WORDS.get(permission, permission)}"


def public(key: ApiKey) -> dict:
    return {
        "id": key.id,
        "role": key.role,
        "name": key.name,
        "prefix": key.prefix,
        "created_at": key.created_at.isoformat() if key.created_at else None,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
        "device_id": key.device_id,
    }


def create_key(engine: Engine, role: str, name: str, plaintext: str | None = None,
               pepper: str | None = None, device_id: str | None = None) -> tuple[ApiKey, str]:
    """`device_id`: bind a kiosk key to that device (service/api/guards.py)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if device_id is not None and (role != "kiosk" or not 0 < len(device_id) <= DEVICE_ID_MAX
                                  or not device_id.isprintable()):
        raise ValueError(f"only a kiosk key can be bound to a device_id (1-{DEVICE_ID_MAX} printable characters)")
    plaintext = plaintext or generate_key()
    key = ApiKey(name=name, role=role, prefix=display_prefix(plaintext), key_hash=hash_key(plaintext, pepper),
                 created_at=datetime.now(timezone.utc), device_id=device_id)
    with write_session(engine) as s:
        s.add(key)
    return key, plaintext


def list_keys(engine: Engine) -> list[ApiKey]:
    with read_session(engine) as s:
        return list(s.scalars(select(ApiKey).order_by(ApiKey.id)))


def get_key(engine: Engine, key_id: int) -> ApiKey | None:
    if not 1 <= key_id <= MAX_KEY_ID:
        return None
    with read_session(engine) as s:
        return s.get(ApiKey, key_id)


def revoke_key(engine: Engine, key_id: int, keep_last_admin: bool = False) -> ApiKey | None:
    """Mark the key revoked (rows stay: audit records refer to them). None if unknown. With
    `keep_last_admin` (the API, the CLI), LastAdminKey when it is the only active admin key:
    the active admin rows are locked (FOR UPDATE; SQLite: the write lock) so two admins
    revoking each other at once cannot both succeed."""
    if not 1 <= key_id <= MAX_KEY_ID:
        return None
    with write_session(engine) as s:
        key = s.get(ApiKey, key_id)
        if keep_last_admin and key is not None and key.role == "admin" and key.revoked_at is None:
            admins = s.scalars(select(ApiKey.id).where(ApiKey.role == "admin", ApiKey.revoked_at.is_(None))
                               .with_for_update()).all()
            if set(admins) <= {key_id}:
                raise LastAdminKey("this is the last active admin key; create another admin key first")
        if key is not None and key.revoked_at is None:
            key.revoked_at = datetime.now(timezone.utc)
        return key


def device_bound(engine: Engine, device_id: str) -> bool:
    """Is an active key bound to this device_id?"""
    with read_session(engine) as s:
        return s.scalars(select(ApiKey.id).where(ApiKey.device_id == device_id, ApiKey.revoked_at.is_(None))
                         .limit(1)).first() is not None


def lookup(engine: Engine, plaintext: str | None, pepper: str | None = None) -> ApiKey | None:
    """The active key for this plaintext, or None."""
    if not plaintext:
        return None
    digest = hash_key(plaintext, pepper)
    with read_session(engine) as s:
        key = s.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).first()
    if key is None or key.revoked_at is not None or not hmac.compare_digest(key.key_hash, digest):
        return None
    return key


def ensure_bootstrap_admin(engine: Engine, plaintext: str | None, pepper: str | None = None) -> ApiKey | None:
    """IDV_BOOTSTRAP_ADMIN_KEY: create that admin key unless a key with that value exists
    (revoked or not: a revoked bootstrap key stays revoked). Returns the key if created. It is
    listed under `bootstrap_label()`; one listed earlier under its own first characters gets
    such a label now. ValueError (the service refuses to start) when it is shorter than
    MIN_BOOTSTRAP_LEN."""
    if not plaintext:
        return None
    if len(plaintext) < MIN_BOOTSTRAP_LEN:
        raise ValueError(f"IDV_BOOTSTRAP_ADMIN_KEY must be at least {MIN_BOOTSTRAP_LEN} characters "
                         "(e.g. `openssl rand -hex 32`)")
    digest = hash_key(plaintext, pepper)
    try:
        with write_session(engine) as s:
            existing = s.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).first()
            if existing is not None:
                if plaintext.startswith(existing.prefix):   # listed by the secret's own first characters
                    existing.prefix = bootstrap_label()
                return None
            key = ApiKey(name="bootstrap-admin", role="admin", prefix=bootstrap_label(), key_hash=digest,
                         created_at=datetime.now(timezone.utc))
            s.add(key)
    except IntegrityError:  # another process created it at the same moment
        return None
    return key


# --- command line ---------------------------------------------------------------------------

def register(sub) -> None:
    p = sub.add_parser("keys", help="manage API keys")
    p.add_argument("--database-url", help="default: IDV_DATABASE_URL or SQLite under ./var/")
    ks = p.add_subparsers(dest="keys_command", required=True)
    c = ks.add_parser("create", help="create a key; its plaintext is printed once, as the last line")
    c.add_argument("--role", required=True, choices=ROLES)
    c.add_argument("--name", required=True)
    c.add_argument("--device-id", help="kiosk keys: bind the key to this device_id (no other key may use it)")
    c.set_defaults(func=_cmd_create)
    ls = ks.add_parser("list", help="list keys (prefix, role, name, state)")
    ls.set_defaults(func=_cmd_list)
    r = ks.add_parser("revoke", help="revoke a key by id")
    r.add_argument("id", type=int)
    r.set_defaults(func=_cmd_revoke)


def _engine(args) -> Engine:
    from service.records.engine import make_engine
    from service.settings import get_settings

    return make_engine(args.database_url or get_settings().database_url)


def _cmd_create(args) -> int:
    from service.settings import get_settings

    engine = _engine(args)
    try:
        key, plaintext = create_key(engine, args.role, args.name, pepper=get_settings().key_pepper,
                                    device_id=args.device_id)
    except ValueError as exc:
        print(str(exc))
        return 1
    bound = f", device {key.device_id!r}" if key.device_id else ""
    print(f"created key {key.id} ({key.role}, {key.name!r}{bound}); store it now, it is not shown again:")
    print(plaintext)
    return 0


def _cmd_list(args) -> int:
    keys = list_keys(_engine(args))
    print(f"{'id':>4}  {'prefix':<12}  {'role':<8}  {'state':<7}  {'created':<19}  name")
    for k in keys:
        state = "revoked" if k.revoked_at else "active"
        print(f"{k.id:>4}  {k.prefix:<12}  {k.role:<8}  {state:<7}  {k.created_at.strftime('%Y-%m-%d %H:%M:%S'):<19}  {k.name}"
              + (f"  (device {k.device_id!r})" if k.device_id else ""))
    return 0


def _cmd_revoke(args) -> int:
    try:
        key = revoke_key(_engine(args), args.id, keep_last_admin=True)
    except LastAdminKey as exc:
        print(str(exc))
        return 1
    if key is None:
        print(f"no key with id {args.id}")
        return 1
    print(f"revoked key {key.id} ({key.role}, {key.name!r})")
    return 0
