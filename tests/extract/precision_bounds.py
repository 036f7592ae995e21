"""How far features extracted at an encoder precision may be from fp32 features of the same clips and encoders:
the bounds of the precision table (BENCHMARKS.md, ``mmfuse bench extract --precisions``: bf16 moves audio features
by up to 0.11 and text by 0.018, fp16 by 0.014 and 0.002), with headroom. An extraction on CUDA picks bf16 (or fp16)
by itself, so a comparison with a CPU fp32 reference reads the precision the run recorded in dataset.json and
allows that precision's deviation, not fp32's."""

from __future__ import annotations

from pathlib import Path

from shards import load_dataset_json

FP32 = 2e-2  # another device's kernels, stored as float16; also every member no encoder precision touches
BOUNDS = {
    "fp32": {"text_feat.npy": FP32, "audio_feat.npy": FP32},
    "bf16": {"text_feat.npy": 0.03, "audio_feat.npy": 0.15},
    "fp16": {"text_feat.npy": 0.01, "audio_feat.npy": 0.03},
}
MODALITY = {"text_feat.npy": "text", "audio_feat.npy": "audio"}


def recorded_precision(out: Path, member: str) -> str:
    """The precision the extraction in ``out`` ran ``member``'s encoder at (fp32 is recorded by omission)."""
    return load_dataset_json(out)["feature_set"]["extractors"][MODALITY[member]].get("precision", "fp32")


def bound(out: Path, member: str) -> float:
    """The largest absolute difference allowed between ``member`` of the run in ``out`` and an fp32 reference."""
    return BOUNDS[recorded_precision(out, member)][member] if member in MODALITY else FP32
