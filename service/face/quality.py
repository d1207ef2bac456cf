"""Quality flags for one face: size, sharpness, exposure, pose. Reported with every answer and
in the audit trail; they refuse a photo only where the decision policy says so
(service/face/policy.py: IDV_REFUSE_QUALITY, and the multiple-faces rule)."""
from __future__ import annotations

import cv2
import numpy as np

BLUR_MIN = 25.0          # variance of the Laplacian on the 150 px grey chip (live photos; chips: IDV_CHIP_BLUR_MIN)
DARK_MAX = 60.0          # mean luma below: underexposed
BRIGHT_MIN = 200.0       # mean luma above: overexposed
YAW_MAX = 0.30           # |nose offset from the eye midline| / eye distance
SMALL_FACE_PX = 64       # below this the face is usable but small (live photos; chips: IDV_CHIP_SMALL_FACE_PX)
FLAGS = ("blurry", "underexposed", "overexposed", "off_frontal", "small_face", "multiple_faces")  # the booleans


def assess(chip: np.ndarray, landmarks: np.ndarray, face_px: float, faces_seen: int,
           small_face_px: float = SMALL_FACE_PX, blur_min: float = BLUR_MIN) -> dict:
    """The flags; `small_face_px` and `blur_min` are the rules of the photo's kind (the pipeline
    passes the chip photo's own: a ~1 KB 102x126 chip is small and soft by design)."""
    grey = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY)
    sharpness = float(cv2.Laplacian(grey, cv2.CV_64F).var())
    brightness = float(grey.mean())
    left_eye, right_eye, nose = landmarks[0], landmarks[1], landmarks[2]
    eye_dist = float(np.linalg.norm(right_eye - left_eye)) or 1.0
    axis = (right_eye - left_eye) / eye_dist
    yaw = float(np.dot(nose - (left_eye + right_eye) / 2.0, axis) / eye_dist)
    roll = float(np.degrees(np.arctan2(axis[1], axis[0])))
    return {
        "sharpness": round(sharpness, 1),
        "brightness": round(brightness, 1),
        "yaw_ratio": round(yaw, 3),
        "roll_deg": round(roll, 1),
        "blurry": sharpness < blur_min,
        "underexposed": brightness < DARK_MAX,
        "overexposed": brightness > BRIGHT_MIN,
        "off_frontal": abs(yaw) > YAW_MAX,
        "small_face": face_px < small_face_px,
        "multiple_faces": faces_seen > 1,
    }
