"""Video: MediaPipe FaceMesh (bundled in the mediapipe 0.10 wheel), 478 landmarks per frame, never dropping frames.

Landmarks are turned into pixels of the video's own size as displayed (x·W, y·H, z·W; a phone's portrait video,
stored as landscape frames with a rotation, is turned upright first), centred on their mean and divided by the
inter-ocular distance, so they are comparable across resolutions and head sizes. Frames over 1280 pixels on
their long side reach FaceMesh scaled down to it (``extract.video.MAX_FRAME_SIDE``); the pixels stay the
video's. Frames without a face keep their place with zeros and ``video_mask`` False. Each clip is a new run of
the tracker's graph (built once per process, reset per clip: nothing carries over), so results do not depend on
which worker processed which clip before. Runs in worker processes; no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from extract.extractors.base import (
    DecodedClip,
    Extractor,
    ExtractorResult,
    ModalityFailure,
    ModelNotFoundError,
    check_finite,
    range_problem,
)
from extract.video import MAX_FRAME_SIDE
from shards.schema import N_LANDMARKS

# Eye corners (MediaPipe face-mesh topology): the midpoint of each pair is an eye centre.
LEFT_EYE, RIGHT_EYE = (33, 133), (362, 263)
MOUTH = (13, 14)
LEFT_LIDS, RIGHT_LIDS = (159, 145), (386, 374)
NOSE_TIP, LEFT_CHEEK, RIGHT_CHEEK = 1, 234, 454


def normalise(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``points (478, 3)`` in pixels -> normalised points, ``(cx, cy, cz, iod)`` and geometry features.

    Geometry: mouth opening, left and right eye opening (all divided by the inter-ocular distance), and a yaw
    proxy in [-1, 1] from the nose tip's distance to each cheek.
    """
    centre = points.mean(0)
    iod = float(np.linalg.norm(points[list(LEFT_EYE)].mean(0) - points[list(RIGHT_EYE)].mean(0)))
    iod = max(iod, 1e-6)
    norm = (points - centre) / iod

    def dist(a: int, b: int) -> float:
        return float(np.linalg.norm(points[a, :2] - points[b, :2]))

    left, right = dist(NOSE_TIP, LEFT_CHEEK), dist(NOSE_TIP, RIGHT_CHEEK)
    geom = np.array(
        [dist(*MOUTH) / iod, dist(*LEFT_LIDS) / iod, dist(*RIGHT_LIDS) / iod, (left - right) / max(left + right, 1e-6)],
        dtype=np.float32,
    )
    return norm, np.array([*centre, iod], dtype=np.float32), geom


class FaceMeshExtractor(Extractor):
    """MediaPipe FaceMesh (refined, 478 points) in video mode, one face per frame (the largest if several)."""

    name = "mediapipe-facemesh"
    # 2: frames decoded with PyAV, each placed by its own time stamp (decord's frame i of the bundled MPEG-1
    # program streams was frame i + 12, 0.48 s late), and landmarks of video stored with a rotation placed in its
    # displayed size (decord turned the frames upright, but landmarks took the stored frame's size).
    version = "2"
    modality = "video"
    members = ("video_lmk.npy", "video_mask.npy", "video_time.npy", "video_norm.npy", "video_geom.npy")
    runs_in = "worker"  # it reads the decoded frames, which stay in the decode worker
    joined = ("video_geom.npy",)  # mouth and eye openness and yaw: inputs after the landmarks (video_geom)

    @dataclass(frozen=True)
    class Settings:
        """``facemesh: {max_faces, min_detection_confidence}``."""

        max_faces: int = 1  # faces per frame; the largest is kept
        min_detection_confidence: float = 0.5  # in [0, 1]

        def problems(self, config: Any) -> list[str]:
            found = [f"facemesh.max_faces: must be >= 1, got {self.max_faces}"] if self.max_faces < 1 else []
            conf = range_problem("facemesh.min_detection_confidence", self.min_detection_confidence, 0.0, 1.0)
            return found + ([conf] if conf else [])

    def __init__(self, max_faces: int = 1, min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5):
        self.max_faces = max_faces
        self.min_detection_confidence = min_detection_confidence
        self.min_tracking_confidence = min_tracking_confidence
        self._mesh: Any = None  # the FaceMesh graph, built on the first clip

    def setup(self, device: str = "cpu") -> None:
        """Import MediaPipe (about 1.4 CPU-seconds) now, in the decode worker's start-up, not in the first clip."""
        import mediapipe  # noqa: F401

    def provenance(self) -> dict[str, Any]:
        # The installed version from the package's metadata: importing MediaPipe only to read it cost the
        # encoder process 1.4 CPU-seconds and its memory, for a graph that runs in the decode workers.
        return {
            "name": self.name,
            "version": self.version,
            "model": f"mediapipe=={mediapipe_version()} face_mesh refine_landmarks",
            "max_faces": self.max_faces,
            "min_detection_confidence": self.min_detection_confidence,
            "min_tracking_confidence": self.min_tracking_confidence,
            "normalisation": "pixels, centred on the mean, divided by inter-ocular distance",
            "max_frame_side": MAX_FRAME_SIDE,  # larger frames reach FaceMesh scaled down to it
            "video_decoder": f"av=={metadata.version('av')}, turned upright by the display matrix",
            "dims": {"landmarks": N_LANDMARKS},
        }

    def __call__(self, clips: Sequence[DecodedClip]) -> list[ExtractorResult]:
        return [self._one(c) for c in clips]

    def _one(self, clip: DecodedClip) -> ExtractorResult:
        frames = clip.frames
        n = len(frames)
        lmk = np.zeros((n, N_LANDMARKS, 3), dtype=np.float32)
        mask = np.zeros(n, dtype=bool)
        norm = np.zeros((n, 4), dtype=np.float32)
        geom = np.zeros((n, 4), dtype=np.float32)
        multi = 0
        mesh = self._tracker()
        i = 0
        for batch, _ in frames.chunks():
            for image in batch:
                faces = mesh.process(np.ascontiguousarray(image)).multi_face_landmarks
                if faces:  # landmarks are fractions of the image: placed in the video's own pixels
                    h, w = (frames.height, frames.width) if frames.width > 0 else image.shape[:2]
                    multi += len(faces) > 1
                    points = max((_pixels(f, w, h) for f in faces), key=_area)
                    lmk[i], norm[i], geom[i] = normalise(points)
                    mask[i] = True
                i += 1
        clip.info["video"] = {"frames": n, "face_frames": int(mask.sum()), "multi_face_frames": multi}
        if n == 0:
            return ModalityFailure("no video frames inside the clip (shorter than one frame)")
        return check_finite(
            {
                "video_lmk.npy": lmk.astype(np.float16),
                "video_mask.npy": mask,
                "video_time.npy": frames.times.astype(np.float32),
                "video_norm.npy": norm,
                "video_geom.npy": geom,
            }
        )

    def _tracker(self) -> Any:
        """The FaceMesh graph, ready for a new clip: built on first use, then reset (closed and started again,
        which clears the tracking state: landmarks are bit-identical to a fresh graph's). Building one per clip
        cost about 8 ms more CPU per clip, and each graph's threads left memory behind."""
        if self._mesh is None:
            import mediapipe as mp

            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=False,
                max_num_faces=self.max_faces,
                refine_landmarks=True,
                min_detection_confidence=self.min_detection_confidence,
                min_tracking_confidence=self.min_tracking_confidence,
            )
        else:
            self._mesh.reset()
        return self._mesh


def mediapipe_version() -> str:
    """The installed mediapipe's version; :class:`ModelNotFoundError`, saying what to do, when there is none."""
    try:
        return metadata.version("mediapipe")
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            "video needs MediaPipe FaceMesh, which ships inside the mediapipe 0.10 wheel, and mediapipe is not "
            "installed: install it (pip install mediapipe==0.10.21), or leave video out with --modalities text,audio"
        ) from None


def _pixels(face: Any, w: int, h: int) -> np.ndarray:
    return np.array([(p.x * w, p.y * h, p.z * w) for p in face.landmark], dtype=np.float32)


def _area(points: np.ndarray) -> float:
    span = points[:, :2].max(0) - points[:, :2].min(0)
    return float(span[0] * span[1])
