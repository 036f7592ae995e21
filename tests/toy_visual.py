"""A visual extractor that no project file knows of, as a user would add one: this module plus one registry line.

``ColourStats`` fills the video modality, in the decode workers, with a 7-wide embedding per frame (``video_emb.npy``:
mean and std of each colour channel, and the centre's brightness, all in [0, 1]) where FaceMesh writes 478 x 3
landmarks; it has a mask and time stamps but no extra inputs. Its record in dataset.json is all the training side
reads of it (tests/train/test_contract.py trains on its shards).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from extract import Registered
from extract.extractors.base import DecodedClip, Extractor, ExtractorResult, ModalityFailure, check_finite, shared
from shards.schema import MEMBERS, MemberSpec

EMB_DIM = 7
EMB = "video_emb.npy"


class ColourStats(Extractor):
    """Per frame: channel means and stds, and the mean brightness of the central quarter, over 255."""

    name = "colour-stats"
    version = "1"
    modality = "video"
    members = (EMB, "video_mask.npy", "video_time.npy")
    runs_in = "worker"

    @dataclass(frozen=True)
    class Settings:
        fps: float | None = shared(None)  # the general frame rate; no knob of its own

    def __init__(self, fps: float | None = None) -> None:
        self.fps = fps

    def output_spec(self) -> dict[str, MemberSpec]:
        emb = MemberSpec("float16", ("Tv", "Demb"), "video", True, "colour statistics per frame", "feature")
        return {EMB: emb, "video_mask.npy": MEMBERS["video_mask.npy"], "video_time.npy": MEMBERS["video_time.npy"]}

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "dims": {"Demb": EMB_DIM}}

    def __call__(self, clips: Sequence[DecodedClip]) -> list[ExtractorResult]:
        return [self._one(c) for c in clips]

    def _one(self, clip: DecodedClip) -> ExtractorResult:
        rows = []
        for batch, _ in clip.frames.chunks():
            for image in batch:
                x = np.asarray(image, np.float32) / 255.0
                h, w = x.shape[:2]
                centre = x[h // 4 : h - h // 4, w // 4 : w - w // 4].mean()
                rows.append([*x.mean((0, 1)), *x.std((0, 1)), centre])
        clip.info["video"] = {"frames": len(rows)}
        if not rows:
            return ModalityFailure("no video frames inside the clip")
        emb = np.asarray(rows, np.float32)
        mask = np.ones(len(rows), bool)
        times = np.asarray(clip.frames.times, np.float32)
        return check_finite({EMB: emb.astype(np.float16), "video_mask.npy": mask, "video_time.npy": times})


ENTRY = Registered(ColourStats, name="colour-stats", modality="video", runs_in="worker", members=ColourStats.members)
