"""Word-aligned features: the "aligned" setting of MulT / MMSA, from the word timings of the manifest.

``AlignWords`` is a sample stage (before ``ToInputs``): for every word ``[word, start, end]`` in the sample's
``meta.json["words"]`` it averages the valid audio frames and video frames whose time stamp
(``audio_time.npy`` / ``video_time.npy``, seconds on the clip's own clock, 0 = clip start) falls in
``[start, end)``; which members are a modality's features, mask and time stamps comes from dataset.json's
records (:mod:`shards.contract`: the feature and its extra members are averaged). Audio and video then have one
step per word (W steps), with a mask that is False for a word no valid frame falls in (a word shorter than a
video frame takes the valid frame nearest its middle, if that frame is within half a frame interval of the
word). Word timings are therefore given on the clip's clock too. Text stays at token level (sub-word tokens;
the shards keep no token-to-word map).

A sample without word timings cannot be aligned: ``DataError`` names it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shards.contract import ModalityContract, builtin_contracts
from train.inputs import DataError
from train.stages import BAD

ALIGNED = ("audio", "video")  # text stays at token level


def word_index(times: np.ndarray, valid: np.ndarray, words: Sequence[Sequence[Any]]) -> list[np.ndarray]:
    """For each word, the indices of the valid frames it averages (possibly empty)."""
    gap = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
    valid_idx = np.flatnonzero(valid)
    out = []
    for _, start, end in words:
        inside = valid_idx[(times[valid_idx] >= start) & (times[valid_idx] < end)]
        if not len(inside) and len(valid_idx):
            mid = (float(start) + float(end)) / 2
            nearest = valid_idx[np.argmin(np.abs(times[valid_idx] - mid))]
            inside = np.array([nearest]) if abs(times[nearest] - mid) <= gap / 2 + (end - start) / 2 else inside
        out.append(inside)
    return out


def pool_words(feat: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """(T, ...) features -> (W, ...) means over each word's frames (zeros for a word without frames)."""
    pooled = np.zeros((len(groups), *feat.shape[1:]), dtype=np.float32)
    for w, idx in enumerate(groups):
        if len(idx):
            pooled[w] = feat[idx].astype(np.float32).mean(0)
    return pooled.astype(feat.dtype)


class AlignWords:
    """Stage: audio and video frames averaged per word (see the module docstring). ``contracts``: the shards'
    records (:attr:`shards.dataset.ShardDataset.contracts`; by default the built-in extractors'); a modality whose
    record names no time member is left as it is."""

    def __init__(self, modalities: Sequence[str], contracts: Mapping[str, ModalityContract] | None = None) -> None:
        found = builtin_contracts() if contracts is None else contracts
        self.frames = {  # modality -> (members averaged per word, mask member or None, time member)
            m: (found[m].averaged(), found[m].mask, found[m].time)
            for m in modalities
            if m in ALIGNED and m in found and found[m].time
        }

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if BAD in sample:
            return sample
        meta = sample["meta.json"]
        words = meta.get("words")
        if not words:
            raise DataError(
                f"sample {meta['key']} has no word timings: align_words needs a 'words' column in the manifest "
                "([word, start, end] on the clip's clock) for every clip"
            )
        out = dict(sample)
        for m, (members, mask_name, time_name) in self.frames.items():
            if meta["modalities"][m]["status"] != "ok" or time_name not in sample:
                continue
            times = np.asarray(sample[time_name], np.float64)
            valid = np.asarray(sample[mask_name], bool) if mask_name else np.ones(len(times), bool)
            groups = word_index(times, valid, words)
            for name in members:
                if name in sample:
                    out[name] = pool_words(np.asarray(sample[name]), groups)
            if mask_name:
                out[mask_name] = np.array([len(g) > 0 for g in groups], bool)
            out[time_name] = np.array([(s + e) / 2 for _, s, e in words], np.float32)
        return out
