"""The one model loader: the detector and the towers resolved from the repository by version,
with the settings passed in.

    load_pipeline(settings)  -> Pipeline   what evaluation, training and the benchmarks run
    load_models(settings)    -> Models     the pipeline plus the decision threshold: what the API serves

`IDV_DETECTOR` names the detector (`mtcnn` or `yunet`: the model folder in the repository and
the class that runs it); `IDV_DETECTOR_VERSION` and `IDV_TOWER_VERSION` name version folders of
models/repository/<detector>/ and models/repository/towers/ ("current" = the one CURRENT names).
`IDV_SCORING` picks what decides: `towers` (that family alone), `sface` (SFace at
`IDV_SFACE_VERSION` alone) or `fused` (both, and the fusion at `IDV_FUSION_VERSION`, which must
name exactly the member versions loaded, else the service refuses to start; with
`IDV_TOWER_VERSION=current` the fused pipeline loads the towers version its fusion names, which
need not be the one towers/CURRENT names).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from service.face.artifacts import ArtifactError, load_towers, resolve_version
from service.face.batcher import batched
from service.face.decide import Decision, Scoring, Threshold
from service.face.detect import FaceDetector
from service.face.yunet import YuNetDetector
from service.face.pipeline import Pipeline
from service.runtime import choose_providers
from service.threads import onnx_threads
from service.settings import Settings

log = logging.getLogger("idverify.loader")
DETECTORS = {"mtcnn": FaceDetector, "yunet": YuNetDetector}   # IDV_DETECTOR -> the class that runs it
SFACE = "sface"      # model name of the SFace family
SCORINGS = ("towers", "sface", "fused")


def load_detector(settings: Settings, providers: list[str] | None = None,
                  threads: int | None = None) -> FaceDetector | YuNetDetector:
    if settings.detector not in DETECTORS:
        raise ValueError(f"IDV_DETECTOR={settings.detector!r}: expected one of {sorted(DETECTORS)}")
    folder = resolve_version(settings.models_dir, settings.detector, settings.detector_version)
    return DETECTORS[settings.detector].from_dir(folder, providers=providers or choose_providers(settings.providers),
                                 threads=onnx_threads(settings) if threads is None else threads,
                                 max_side=settings.detect_max_side, min_side=settings.detect_min_side)


def load_pipeline(settings: Settings) -> Pipeline:
    """Detector and towers, each file checked against its manifest; no decision threshold."""
    if settings.scoring not in SCORINGS:
        raise ArtifactError(f"IDV_SCORING must be one of {', '.join(SCORINGS)}, not {settings.scoring!r}")
    providers = choose_providers(settings.providers)
    detector = load_detector(settings, providers)
    make_tower = None
    if settings.tower_backend == "triton":
        from service.face.triton import triton_factory   # tritonclient only when asked for

        make_tower = triton_factory(settings.triton_url)
    elif settings.tower_backend != "onnxruntime":
        raise ValueError(f"IDV_TOWER_BACKEND={settings.tower_backend!r}: expected onnxruntime or triton")

    def family(name: str, version: str):
        towers = load_towers(settings.models_dir, name, version, providers, onnx_threads(settings),
                             make_tower=make_tower if name == settings.towers else None)
        return batched(towers, settings.batch_wait_ms, settings.batch_max)

    if settings.scoring == "sface":
        return Pipeline(settings, detector, family(SFACE, settings.sface_version))
    if settings.scoring == "towers":
        return Pipeline(settings, detector, family(settings.towers, settings.tower_version))
    from service.face.fusion import load_fusion

    fusion = load_fusion(settings.models_dir, settings.fusion_version)
    tower_version = settings.tower_version
    # "current" as resolve_version reads it: the fusion's own towers
    if tower_version == "current" and settings.towers in fusion.manifest["members"]:
        tower_version = fusion.manifest["members"][settings.towers]["version"]
    towers = family(settings.towers, tower_version)
    extra = {name: family(name, want["version"]) for name, want in fusion.manifest["members"].items()
             if name != towers.manifest["name"]}
    fusion.check_members({towers.manifest["name"]: towers, **extra})
    return Pipeline(settings, detector, towers, extra=extra, fusion=fusion)


@dataclass
class Models:
    """What /verify runs: the pipeline (analyse, scores) and the scoring (decide)."""
    pipeline: Pipeline
    scoring: Scoring

    @property
    def threshold(self) -> Threshold:
        """The served score's threshold."""
        return self.scoring.threshold

    @property
    def model_version(self) -> str:
        return self.pipeline.model_version

    @property
    def warm(self) -> bool:
        return self.pipeline.warm

    def warmup(self) -> None:
        self.pipeline.warmup()

    def decide(self, id_side, live_side) -> Decision:
        """The served decision on two analysed photos (`Pipeline.analyse` sides)."""
        scores = self.pipeline.scores(id_side, live_side)
        return self.scoring.decide(scores, id_side.embeddings, live_side.embeddings)


def load_models(settings: Settings) -> Models:
    """The served models: refuses (ValueError) a threshold the calibration table cannot place."""
    pipeline = load_pipeline(settings)
    fusion = pipeline.fusion
    if fusion is None:
        threshold = Threshold.from_settings(settings, pipeline.towers.calibration)
        scoring = Scoring(pipeline.primary, threshold)
    else:
        threshold = Threshold.from_settings(settings, fusion.calibration)
        far = threshold.far if threshold.far is not None else settings.far_target
        fallback = {name: Threshold.from_calibration(t.calibration, score=None, far_target=far)
                    for name, t in pipeline.families.items()}
        scoring = Scoring("fused", threshold, fuse=fusion.score_pair, fallback=fallback)
    log.info("loaded %s (detector %s) on %s; threshold %.4f (FAR %s)", pipeline.model_version,
             pipeline.detector_version, pipeline.providers[0], threshold.score, threshold.far)
    return Models(pipeline, scoring)
