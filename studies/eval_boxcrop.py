"""``idverify eval`` with box-crop chips, for towers whose manifest template is
``{"kind": "box", "margin": M, "size": S}`` (FaceNet), until service/face/pipeline.py has a box mode.

Measurement only: it patches ``service.face.pipeline`` in this process so that the chip is
``studies.align_box.crop_box(image, face.box, size, margin)`` of the face ``select_face``
chose, instead of the 5-point similarity warp; everything else (decode, detection, chip
simulation, flip averaging, scoring, reports) is the normal eval.

    IDV_TOWER_VERSION=facenet .venv/bin/python -m studies.eval_boxcrop eval --protocol lfw-ivs --folds 9,10 \\
        --out reports/lfw-ivs-folds9-10-facenet

The margin and size come from the loaded manifest (``template.margin``/``template.size``).
"""
from __future__ import annotations

import sys

from service.face import pipeline as P
from studies.align_box import crop_box

_select_face = P.select_face
_state: dict = {}


def _select_and_remember(faces, shape):
    face = _select_face(faces, shape)
    _state["face"] = face
    return face


def _box_chip(image, landmarks, template, size):
    return crop_box(image, _state["face"].box, size, _state["margin"])


_init = P.Pipeline.__init__


def _init_box(self, settings, detector, towers):
    _init(self, settings, detector, towers)
    tpl = towers.manifest["template"]
    if tpl.get("kind") != "box":
        raise SystemExit(f"{towers.version}: manifest template is not a box crop (kind {tpl.get('kind')!r})")
    _state["margin"] = float(tpl["margin"])


P.select_face = _select_and_remember
P.align = _box_chip
P.Pipeline.__init__ = _init_box

if __name__ == "__main__":
    from service.cli import main

    sys.exit(main(sys.argv[1:]))
