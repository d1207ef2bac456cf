"""The batch runner of evaluation: every (image, side) through the service pipeline once."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from models.eval import chipsim
from service.errors import ApiError
from service.face.detect import select_face

FIELD = {"id": "id_photo", "live": "live_photo"}


class Embedder:
    """Runs (image, side) items through the pipeline once each and keeps the embeddings.

    Uses `Pipeline.prepare` (decode -> detect -> select -> size check -> align) and embeds the
    aligned chips in batches; `tests/models/eval/test_evaluate.py` checks that the result equals
    `analyse(...).embedding`. The id side gets simulated chip bytes, the live side the file bytes.
    Every family of the pipeline is embedded (one detection, one alignment per family):
    `family_emb[family]` holds each family's embeddings, `emb` the primary family's.
    """

    def __init__(self, pipeline, data_dir: Path, *, seed: int = 0, chip_landmarks: str = "fixed",
                 chip_encoding: str = "rgb",
                 batch_size: int = 32, progress: bool = True):
        self.pipeline = pipeline
        self.images_dir = Path(data_dir) / "lfw" / "images"
        self.seed = int(seed)
        self.chip_landmarks = chip_landmarks
        self.chip_encoding = chip_encoding
        self.batch_size = max(1, int(batch_size))
        self.progress = progress
        self.timings: dict[str, float] = {}   # stage -> total ms
        self.counts: dict[str, int] = {}      # stage -> calls
        self.emb: dict[tuple[str, str], np.ndarray] = {}
        self.family_emb: dict[str, dict[tuple[str, str], np.ndarray]] = {f: {} for f in pipeline.families}
        self.fta: dict[tuple[str, str], str] = {}
        self.chip_bytes: list[int] = []
        self.chip_fallbacks = 0
        self.wall_s = 0.0

    # bytes for one item -------------------------------------------------------------------
    def _add(self, stage: str, ms: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + ms
        self.counts[stage] = self.counts.get(stage, 0) + 1

    def chip_for(self, rel: str) -> bytes:
        from PIL import Image

        t0 = time.perf_counter()
        with Image.open(self.images_dir / rel) as im:
            img = np.asarray(im.convert("RGB"))
        landmarks = None
        if self.chip_landmarks == "detect":
            faces = self.pipeline.detector.detect(img)
            if faces:
                landmarks = select_face(faces, img.shape).landmarks
            else:
                self.chip_fallbacks += 1
        data = chipsim.simulate_chip(img, landmarks, chipsim.chip_rng(f"lfw/images/{rel}", self.seed),
                                     encoding=self.chip_encoding)
        self._add("chipsim", (time.perf_counter() - t0) * 1e3)
        self.chip_bytes.append(len(data))
        return data

    def prepare(self, data: bytes, field: str) -> dict[str, np.ndarray | None]:
        """decode -> detect -> select -> size check -> align: `Pipeline.prepare_families`
        (family -> chip, None where that family does not take the face), timed here."""
        timings: dict[str, float] = {}
        try:
            return self.pipeline.prepare_families(data, field, timings)[1]
        finally:
            for stage, ms in timings.items():
                self._add(stage, ms)

    def _flush(self, side: str, keys: list, chips: list) -> None:
        if not chips:
            return
        for family, table in self.family_emb.items():
            rows = [(k, c[family]) for k, c in zip(keys, chips) if c[family] is not None]
            if not rows:
                continue
            t0 = time.perf_counter()
            out = self.pipeline.tower(FIELD[side], family).embed(np.stack([c for _, c in rows]))
            ms = (time.perf_counter() - t0) * 1e3
            self.timings["embed"] = self.timings.get("embed", 0.0) + ms   # all families, per image
            if len(self.family_emb) > 1:
                self.timings[f"embed:{family}"] = self.timings.get(f"embed:{family}", 0.0) + ms
                self.counts[f"embed:{family}"] = self.counts.get(f"embed:{family}", 0) + len(rows)
            for (k, _), e in zip(rows, out):
                if np.all(np.isfinite(e)):
                    table[k] = np.asarray(e, dtype=np.float32)
        self.counts["embed"] = self.counts.get("embed", 0) + len(keys)
        primary = self.family_emb[self.pipeline.primary]
        for k in keys:
            if k in primary:
                self.emb[k] = primary[k]
        keys.clear()
        chips.clear()

    def run(self, items: list[tuple[str, str]]) -> None:
        """items: (relpath, side) with side in {"id", "live"}; already-done items are skipped."""
        from tqdm import tqdm

        todo = [it for it in dict.fromkeys(items) if it not in self.emb and it not in self.fta]
        todo.sort(key=lambda it: (it[1], it[0]))
        t_start = time.perf_counter()
        pending: dict[str, tuple[list, list]] = {"id": ([], []), "live": ([], [])}
        bar = tqdm(todo, desc="analyse", unit="img", disable=not self.progress, mininterval=1.0)
        for rel, side in bar:
            try:
                if side == "id":
                    data = self.chip_for(rel)
                else:
                    t0 = time.perf_counter()
                    data = (self.images_dir / rel).read_bytes()
                    self._add("read", (time.perf_counter() - t0) * 1e3)
                chip = self.prepare(data, FIELD[side])
            except ApiError as exc:
                self.fta[(rel, side)] = exc.code
                continue
            keys, chips = pending[side]
            keys.append((rel, side))
            chips.append(chip)
            if len(chips) >= self.batch_size:
                self._flush(side, keys, chips)
        for side, (keys, chips) in pending.items():
            self._flush(side, keys, chips)
        self.wall_s += time.perf_counter() - t_start
        bar.close()
