"""Extraction under ``torchrun --nproc-per-node 2`` with decode workers and video: the ranks split the clips,
each extracts on its own device (``cuda:LOCAL_RANK % device_count``: both on cuda:0 when one GPU is all there
is), and the features are the single-process CPU extraction's."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HAS_FACEMESH, MEDIA, bundled_rows, write_manifest
from precision_bounds import bound
from rank_probe import torchrun

from shards import iter_shard


def samples(out: Path) -> tuple[Counter, dict[str, dict]]:
    counts, found = Counter(), {}
    for tar in sorted(out.glob("*.tar")):
        for s in iter_shard(tar):
            counts[s["__key__"]] += 1
            found[s["__key__"]] = s
    return counts, found


def cuda_id() -> str:
    gpus = torch.cuda.device_count()
    return "cuda-2gpus" if gpus >= 2 else "cuda-ranks-share-1gpu" if gpus == 1 else "cuda-none"


@pytest.mark.integration
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu, id=cuda_id())])
def test_two_ranks_extract_every_clip_once_on_their_own_device(
    bundled_dataset: Path, tiny_text_model: Path, tiny_audio_model: Path, tmp_path: Path, device: str
) -> None:
    manifest = write_manifest(tmp_path / "label.csv", bundled_rows())
    out = tmp_path / "out"
    args = [
        "extract", str(manifest), "--media-root", str(MEDIA), "--out", str(out), "--workers", "2",
        "--shard-size", "1", "--device", device, "--text-model", str(tiny_text_model),
        "--audio-model", str(tiny_audio_model), "-q",
    ]  # fmt: skip
    if not HAS_FACEMESH:  # the GPU image: FaceMesh runs in the decode workers, and they have no mediapipe there
        args += ["--modalities", "text,audio"]
    visible = {"CUDA_VISIBLE_DEVICES": "0,1" if torch.cuda.device_count() >= 2 else "0"} if device == "cuda" else {}
    ranks = torchrun(2, tmp_path / "ranks", args, visible, timeout=300)
    if device == "cpu":
        assert [r["device"] for r in ranks] == ["cpu", "cpu"]
    else:  # each rank on its own GPU, and it did run there
        expected = ["cuda:0", "cuda:1"] if torch.cuda.device_count() >= 2 else ["cuda:0", "cuda:0"]
        assert [r["device"] for r in ranks] == expected
        assert all(r["cuda_peak_bytes"] > 0 for r in ranks)
    counts, got = samples(out)
    _, cpu = samples(bundled_dataset)  # the same clips and encoders, one process on the CPU
    assert set(counts) == set(cpu) and set(counts.values()) == {1}  # every clip once, over both ranks
    members = ["text_feat.npy", "audio_feat.npy"]
    if HAS_FACEMESH:
        assert {s["__key__"] for s in cpu.values() if "video_lmk.npy" in s}  # the video path ran
        members += ["video_lmk.npy", "video_mask.npy"]
    for key, reference in cpu.items():
        for member in members:
            assert (member in reference) == (member in got[key]), (key, member)
            if member in reference:  # CUDA picks bf16 by itself: its bound against the fp32 reference
                np.testing.assert_allclose(
                    got[key][member].astype(np.float32),
                    reference[member].astype(np.float32),
                    atol=bound(out, member),
                    err_msg=key,
                )
