"""The decision policy: every rule that can decide a /verify call, in one place, in the order
they apply, and the name each one leaves in the answer and the audit record (`rule`).

1. `liveness:missing` / `liveness:failed`: with IDV_REQUIRE_LIVENESS, the kiosk's own
   presentation-attack check must come with the call and have passed (422 `liveness_required`
   / `liveness_failed`, field `liveness`). idverify does no presentation-attack detection itself.
2. `multiple_faces:id_photo`: the chip photo must hold exactly one face (422 `multiple_faces`).
   `multiple_faces:live_photo`: a live photo with several faces is scored only when the chosen
   face clearly dominates: its box area at least IDV_LIVE_FACE_DOMINANCE times the next
   largest face's (422 `multiple_faces`).
3. `quality:<flag>:<field>`: a quality flag listed in IDV_REFUSE_QUALITY is set on that photo
   (422 `quality_<flag>`). Entries are `flag` (both photos) or `id_photo:flag` / `live_photo:flag`.
4. `score_threshold`: the pair's score against the threshold (service/face/decide.py) decided
   match or no_match.

Rules 2 and 3 run on each photo as soon as it is analysed, so the id photo's refusal wins over
the live photo's, as an id photo's input error does. Calls refused before a rule applied (bad
input, no face, a face too small, auth, rate limit) carry no rule: their error code says why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from service import errors
from service.errors import ApiError
from service.face import quality

RULE_SCORE = "score_threshold"
PHOTOS = ("id_photo", "live_photo")
# the flags IDV_REFUSE_QUALITY may list; multiple_faces has its own rule (2)
REFUSABLE = tuple(f for f in quality.FLAGS if f != "multiple_faces")
QUALITY_CODES = {"blurry": errors.QUALITY_BLURRY, "underexposed": errors.QUALITY_UNDEREXPOSED,
                 "overexposed": errors.QUALITY_OVEREXPOSED, "off_frontal": errors.QUALITY_OFF_FRONTAL,
                 "small_face": errors.QUALITY_SMALL_FACE}


class PolicyConfigError(ValueError):
    """A policy setting the service cannot run with; the message names the IDV_ variable."""


class PolicyRefusal(ApiError):
    """A 422 decided by a policy rule; the answer's error names the rule."""

    def __init__(self, code: str, message: str, field: str, rule: str):
        super().__init__(code, message, field, status=422)
        self.rule = rule

    def to_dict(self) -> dict:
        body = super().to_dict()
        body["error"]["rule"] = self.rule
        return body


def dominance(faces: list, chosen) -> float:
    """The chosen face's box area over the largest other face's (inf when it is alone)."""
    others = [f.area for f in faces if f is not chosen]
    if not others:
        return math.inf
    return chosen.area / max(max(others), 1e-9)


def parse_refusals(value: str) -> frozenset[tuple[str, str]]:
    """IDV_REFUSE_QUALITY -> {(photo, flag)}; PolicyConfigError naming the bad entry."""
    out: set[tuple[str, str]] = set()
    for entry in (e.strip() for e in value.split(",")):
        if not entry or entry == "none":
            continue
        photo, _, flag = entry.rpartition(":")
        if flag not in REFUSABLE or (photo and photo not in PHOTOS):
            raise PolicyConfigError(f"IDV_REFUSE_QUALITY: {entry!r} is not a flag ({', '.join(REFUSABLE)}), "
                                    f"optionally prefixed with id_photo: or live_photo:")
        out.update((p, flag) for p in ((photo,) if photo else PHOTOS))
    return frozenset(out)


@dataclass(frozen=True)
class Policy:
    live_face_dominance: float = 2.0
    refuse: frozenset[tuple[str, str]] = frozenset()   # (photo, flag)
    require_liveness: bool = False

    @classmethod
    def from_settings(cls, settings) -> "Policy":
        ratio = settings.live_face_dominance
        if not (math.isfinite(ratio) and ratio >= 1.0):
            raise PolicyConfigError(f"IDV_LIVE_FACE_DOMINANCE must be a number >= 1, not {ratio}")
        return cls(ratio, parse_refusals(settings.refuse_quality), settings.require_liveness)

    def describe(self) -> str:
        refused = ", ".join(f"{p}:{f}" for p, f in sorted(self.refuse)) or "none"
        return (f"id_photo: one face; live_photo: several faces only when one is {self.live_face_dominance:g}x the "
                f"next's area; quality flags that refuse: {refused}; liveness required: {self.require_liveness}")

    # --- rule 1 ----------------------------------------------------------------------------

    def check_liveness(self, liveness) -> None:
        """`liveness`: the kiosk's result (service.api.verify_input.Liveness) or None."""
        if not self.require_liveness:
            return
        if liveness is None:
            raise PolicyRefusal(errors.LIVENESS_REQUIRED, "a liveness result from the kiosk's presentation-attack "
                                "check is required (IDV_REQUIRE_LIVENESS)", "liveness", "liveness:missing")
        if not liveness.passed:
            raise PolicyRefusal(errors.LIVENESS_FAILED, f"the kiosk's liveness check ({liveness.vendor}) did not pass",
                                "liveness", "liveness:failed")

    # --- rules 2 and 3 ---------------------------------------------------------------------

    def check_photo(self, side) -> None:
        """One analysed photo (a pipeline Side): its faces, then its quality flags."""
        field = side.field
        if len(side.faces) > 1:
            if field == "id_photo":
                raise PolicyRefusal(errors.MULTIPLE_FACES, f"the ID-chip photo shows {len(side.faces)} faces; "
                                    "it must show exactly one", field, "multiple_faces:id_photo")
            ratio = dominance(side.faces, side.face)
            if ratio < self.live_face_dominance:
                raise PolicyRefusal(errors.MULTIPLE_FACES, f"the live photo shows {len(side.faces)} faces and none "
                                    f"dominates (the largest is {ratio:.2f}x the next's area; "
                                    f"{self.live_face_dominance:g}x needed): one person only, please",
                                    field, "multiple_faces:live_photo")
        for flag in REFUSABLE:
            if (field, flag) in self.refuse and side.quality.get(flag):
                raise PolicyRefusal(QUALITY_CODES[flag], f"the {field.replace('_', ' ')} is refused: {flag} "
                                    "(IDV_REFUSE_QUALITY)", field, f"quality:{flag}:{field}")
