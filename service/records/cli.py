"""`idverify audit verify`: walk the audit hash chain and name the first broken record.
`idverify audit purge`: delete retained images past IDV_RETENTION_DAYS and their data keys
(service/records/retention.py); exit 1 when the deleted keys could not be scrubbed from the files.
`idverify audit image-key`: print a new key for IDV_IMAGE_KEY."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("audit", help="audit trail tools")
    p.add_argument("--database-url", help="default: IDV_DATABASE_URL or SQLite under ./var/")
    cmds = p.add_subparsers(dest="audit_command", required=True)
    v = cmds.add_parser("verify", help="check every record's hash and link; exit 1 at the first broken one")
    v.set_defaults(func=_cmd_verify)
    pg = cmds.add_parser("purge", help="delete retained images older than IDV_RETENTION_DAYS (records and hashes stay)")
    pg.add_argument("--days", type=int, help="default: IDV_RETENTION_DAYS")
    pg.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
    pg.set_defaults(func=_cmd_purge)
    k = cmds.add_parser("image-key", help="print a new random IDV_IMAGE_KEY (AES-256-GCM, urlsafe base64)")
    k.set_defaults(func=_cmd_image_key)


def _cmd_verify(args) -> int:
    from service.records.audit import verify_chain
    from service.records.engine import make_engine
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


def _cmd_purge(args) -> int:
    from service.records import retention
    from service.records.engine import make_engine
    from service.settings import get_settings

    settings = get_settings()
    days = settings.retention_days if args.days is None else args.days
    if days < 0:
        print("--days must be >= 0")
        return 2
    engine = make_engine(args.database_url or settings.database_url, settings)
    try:
        result = retention.purge(engine, days, dry_run=args.dry_run)
    finally:
        engine.dispose()
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {result.images} retained images of {result.records} records stored before "
          f"{result.cutoff:%Y-%m-%d %H:%M:%S} UTC ({days} days); audit records and hashes are kept")
    if args.dry_run:
        return 0
    print(f"deleted {result.keys} image data keys: what is left of those images in the database files "
          "cannot be decrypted")
    if result.unscrubbed:
        print(f"WARNING: the deleted keys may still be readable in the database files ({result.unscrubbed}); "
              "run the purge again")
        return 1
    return 0


def _cmd_image_key(_args) -> int:
    from service.records.retention import generate_key

    print(generate_key())
    return 0
