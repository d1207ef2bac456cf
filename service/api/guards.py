"""What /verify checks of a call beyond the format of its inputs (docs/security.md, "Replays
and the same image"; README, keys):

- device binding: a key bound to a device_id (`keys create --device-id`) verifies for that
  device only (a call without device_id is that device's), and no other key may use a bound
  device_id: 403 `device_mismatch`; the refused call's record carries the caller's own device_id
  (its binding, or none), never the one it claimed.
- the same image on both sides: the live photo byte-identical to the chip photo, or decoding to
  the same pixels, is 422 `same_image` (field live_photo).
- replays: a live photo (its SHA-256) that a decided call already sent within
  `IDV_REPLAY_WINDOW_SECONDS` is flagged (`live_photo_seen_before` in the answer and the record),
  and refused with 409 `live_photo_replayed` when `IDV_REFUSE_REPLAYED_LIVE` is on.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
from starlette.concurrency import run_in_threadpool

from service.errors import DEVICE_MISMATCH, LIVE_PHOTO_REPLAYED, SAME_IMAGE, ApiError
from service.face.decode import decode_image
from service.records import audit, keys

LIVE = "live_photo"


async def before_analysis(state, key, attempt) -> None:
    """Device binding, the same bytes on both sides, and the replay check, in that order (the
    cheapest refusals first; the analysis does not run for a refused call)."""
    await run_in_threadpool(bind_device, state.engine, key, attempt.input)
    if attempt.sides["id_photo"].sha256 == attempt.sides[LIVE].sha256:
        raise _same_image("the live photo is the ID photo itself")
    attempt.live_seen_before = await run_in_threadpool(live_seen_before, state.engine, state.settings,
                                                       attempt.sides[LIVE].sha256)
    if attempt.live_seen_before and state.settings.refuse_replayed_live:
        raise ApiError(LIVE_PHOTO_REPLAYED, "this live photo was already sent for a verification within the last "
                       f"{state.settings.replay_window_seconds} s; take a new one", LIVE, status=409)


async def after_analysis(settings, attempt) -> None:
    """The same pixels on both sides. Only when both faces were found at the same place (0.1 px)
    are the two photos decoded again and compared, so other calls pay nothing."""
    id_side, live_side = attempt.sides["id_photo"], attempt.sides[LIVE]
    if id_side.box is None or id_side.box != live_side.box:
        return
    if await run_in_threadpool(same_pixels, attempt.input.id_photo, attempt.input.live_photo, settings):
        raise _same_image("the live photo shows the same pixels as the ID photo")


def _same_image(what: str) -> ApiError:
    return ApiError(SAME_IMAGE, f"{what}; take a live photo of the person", LIVE, status=422)


def same_pixels(id_photo: bytes, live_photo: bytes, settings) -> bool:
    a = decode_image(id_photo, "id_photo", settings)
    b = decode_image(live_photo, LIVE, settings)
    return a.shape == b.shape and np.array_equal(a, b)


def live_seen_before(engine, settings, sha256: str) -> bool | None:
    """None when the check is off (a window of 0)."""
    window = settings.replay_window_seconds
    if window <= 0:
        return None
    return audit.live_photo_seen(engine, sha256, datetime.now(timezone.utc) - timedelta(seconds=window))


def bind_device(engine, key, inp) -> None:
    """Fills a bound key's device_id into a call that names none; 403 for a device_id that is
    not the caller's to use (the call's record then keeps the caller's own)."""
    if key.device_id is not None and inp.device_id is None:
        inp.device_id = key.device_id
        return
    if inp.device_id is None or inp.device_id == key.device_id:
        return
    if key.device_id is not None:
        message = "this key is bound to another device_id"
    elif keys.device_bound(engine, inp.device_id):
        message = "this device_id is bound to another key"
    else:
        return
    inp.device_id = key.device_id
    raise ApiError(DEVICE_MISMATCH, message, "device_id", status=403)
