"""Without mediapipe (the GPU machine's image): extraction with video stops with one clear error, and the tests'
stand-in tracker gives landmarks where a frame is lit."""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest

from extract.extractors import facemesh
from extract.extractors.base import ModelNotFoundError
from extract.extractors.facemesh import FaceMeshExtractor


def test_missing_mediapipe_is_one_error_saying_what_to_do(monkeypatch) -> None:
    def absent(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(facemesh.metadata, "version", absent)
    with pytest.raises(ModelNotFoundError, match=r"mediapipe is not installed: install it \(pip install mediapipe"):
        FaceMeshExtractor().provenance()
    with pytest.raises(ModelNotFoundError, match="or leave video out with --modalities text,audio"):
        facemesh.mediapipe_version()


def test_stand_in_tracker_finds_one_face_in_a_lit_frame_only() -> None:
    from facemesh_stand_in import StandInMesh

    lit = np.zeros((90, 120, 3), np.uint8)
    lit[10:40, 70:110] = 255  # the bright part: upper right
    faces = StandInMesh().process(lit).multi_face_landmarks
    assert len(faces) == 1 and len(faces[0].landmark) == facemesh.N_LANDMARKS
    xs = np.array([p.x for p in faces[0].landmark])
    assert 0.6 < xs.mean() < 0.8  # centred on the lit part's centroid (x = 90 / 120)
    assert StandInMesh().process(np.zeros((90, 120, 3), np.uint8)).multi_face_landmarks is None
