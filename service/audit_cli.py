"""`idverify audit verify`: walk the audit hash chain and name the first broken record."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("audit", help="audit trail tools")
    p.add_argument("--database-url", help="default: IDV_DATABASE_URL or SQLite under ./var/")
    cmds = p.add_subparsers(dest="audit_command", required=True)
    v = cmds.add_parser("verify", help="check every record's hash and link; exit 1 at the first broken one")
    v.set_defaults(func=_cmd_verify)


def _cmd_verify(args) -> int:
    from service.audit import verify_chain
    from service.db import make_engine
    from service.settings import get_settings

    engine = make_engine(args.database_url or get_settings().database_url)
    try:
        report = verify_chain(engine)
    finally:
        engine.dispose()
    if report.ok:
        head = f"head seq {report.head_seq} hash {report.head_hash}" if report.head_seq else "empty"
        print(f"audit chain ok: {report.checked} records; {head}")
        return 0
    print(f"audit chain BROKEN at record {report.broken_id} (seq {report.broken_seq}): {report.reason}")
    print(f"{report.checked} records before it verified")
    return 1
