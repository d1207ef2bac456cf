"""The console's page of one audit record, and its retained images.

GET  /console/records/{id}                 every field, faces, hashes, chain state, images
GET  /console/records/{id}/images/{side}   a retained image with its face box (decrypted here,
                                           decoded by the pipeline's bounded decoder: images.py)
"""
from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.console import routes, stats
from service.console.images import annotated_jpeg, native_size
from service.records import audit, keys, retention
from service.records.engine import read_session
from service.records.tables import ApiKey

log = logging.getLogger("idverify.console")
router = APIRouter(prefix="/console", include_in_schema=False)


# --- one record -----------------------------------------------------------------------------

@router.get("/records/{record_id}")
def record_detail(record_id: str, request: Request) -> Response:
    principal = routes._principal(request)
    if principal is None:
        return routes._to_login(request)
    state = routes._state(request)
    record = audit.get(state.engine, record_id[:64])
    if record is None:
        return routes._message(request, principal, 404, "Not found", f"There is no audit record {record_id[:64]}.")
    key = None
    if record.key_id is not None:
        with read_session(state.engine) as s:
            key = s.get(ApiKey, record.key_id)
    sides = retention.stored_sides(state.engine, record.id)
    sizes = _native_sizes(state, record.id, sides)
    chain_run = routes._chain_cache(request).current(state.engine, refresh="background")
    return routes._render(
        request, "detail.html", principal, title=f"Record {record.seq}", r=audit.to_public(record),
        key=keys.public(key) if key else None,
        chain_state=stats.record_chain_state(state.engine, record, chain_run), chain=chain_run,
        images={side: f"{routes._base(request)}/records/{record.id}/images/{side}" for side in sides}, sizes=sizes,
        retain_on=state.settings.retain_images, can_decrypt=getattr(state, "image_cipher", None) is not None,
        retain_until=audit.utc(record.retain_until).strftime("%Y-%m-%d %H:%M UTC") if record.retain_until else None,
    )


def _native_sizes(state, record_id: str, sides) -> dict[str, tuple[int, int]]:
    """Each retained image's size as uploaded (the page states it: the chip photo is shown
    enlarged to the live photo's height)."""
    cipher = getattr(state, "image_cipher", None)
    sizes = {}
    for side in sides if cipher is not None else ():
        try:
            data = retention.load(state.engine, cipher, record_id, side)
        except retention.ImageDecryptError:
            continue
        if data is not None and (size := native_size(data)) is not None:
            sizes[side] = size
    return sizes


@router.get("/records/{record_id}/images/{side}")
def record_image(record_id: str, side: str, request: Request) -> Response:
    principal = routes._principal(request)
    if principal is None:
        return routes._to_login(request)
    if side not in ("id", "live"):
        return routes._harden(Response("unknown side", status_code=404, media_type="text/plain"))
    state = routes._state(request)
    record = audit.get(state.engine, record_id[:64])
    if record is None:
        return routes._harden(Response("no such record", status_code=404, media_type="text/plain"))
    try:
        data = retention.load(state.engine, getattr(state, "image_cipher", None), record.id, side)
    except retention.ImageDecryptError as exc:
        log.warning("retained image %s/%s does not decrypt: %s", record.id, side, exc)
        return routes._harden(Response("the image cannot be decrypted with the configured IDV_IMAGE_KEY",
                                       status_code=409, media_type="text/plain"))
    if data is None:
        return routes._harden(Response("no image retained", status_code=404, media_type="text/plain"))
    field = "id_photo" if side == "id" else "live_photo"
    try:
        jpeg = annotated_jpeg(data, getattr(record, f"{side}_box"), field, state.settings)
    except ValueError as exc:
        return routes._harden(Response(str(exc), status_code=422, media_type="text/plain"))
    log.info("console image view %s/%s by key %d", record.id, side, principal.key_id)
    return routes._harden(Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store, private"}))
