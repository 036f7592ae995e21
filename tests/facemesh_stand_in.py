"""Stand-in FaceMesh for machines without mediapipe (the GPU machine's image), installed by conftest there only.

FaceMesh runs on the CPU and is tested on the CPU machine; the GPU tests need shards and clips with video
landmarks, not MediaPipe's. The stand-in tracker gives one face per frame that is not dark: a fixed template of
478 points (seeded) centred on the frame's brightness centroid. Everything after the tracker (pixel placement,
normalisation, masks, the schema) is the real extractor's; the provenance names the stand-in.
"""

from __future__ import annotations

from importlib import metadata
from types import SimpleNamespace

import numpy as np

from extract.extractors import facemesh
from extract.extractors.facemesh import N_LANDMARKS, FaceMeshExtractor

STAND_IN = "absent: test stand-in landmarks (tests/facemesh_stand_in.py)"
TEMPLATE = np.random.default_rng(0).uniform(-0.15, 0.15, (N_LANDMARKS, 3))  # offsets, fractions of the frame


class StandInMesh:
    """``mediapipe.solutions.face_mesh.FaceMesh``'s ``process`` and ``reset``, deterministic in the image."""

    def process(self, image: np.ndarray) -> SimpleNamespace:
        gray = image.astype(np.float32).mean(axis=-1)
        if gray.mean() < 10:  # a dark frame: no face
            return SimpleNamespace(multi_face_landmarks=None)
        h, w = gray.shape
        weights = gray / gray.sum()
        cy, cx = (weights.sum(axis=1) @ np.arange(h)) / h, (weights.sum(axis=0) @ np.arange(w)) / w
        points = TEMPLATE + (cx, cy, 0.0)
        landmarks = [SimpleNamespace(x=float(x), y=float(y), z=float(z)) for x, y, z in points]
        return SimpleNamespace(multi_face_landmarks=[SimpleNamespace(landmark=landmarks)])

    def reset(self) -> None:
        pass


class StandInMetadata:
    """``importlib.metadata`` as the extractor's provenance reads it, with mediapipe named as absent."""

    PackageNotFoundError = metadata.PackageNotFoundError

    @staticmethod
    def version(name: str) -> str:
        return STAND_IN if name == "mediapipe" else metadata.version(name)


def install(mp) -> None:
    """Patch (with the ``pytest.MonkeyPatch`` ``mp``) the FaceMesh extractor of this process to the stand-in."""
    mp.setattr(facemesh, "metadata", StandInMetadata)
    mp.setattr(FaceMeshExtractor, "setup", lambda self, device="cpu": None)
    mp.setattr(FaceMeshExtractor, "_tracker", lambda self: StandInMesh())
