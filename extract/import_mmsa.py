"""``mmfuse import-mmsa``: published feature pickles -> our shards, so our models train on the standard features.

Formats read (detected from the keys):

- **MMSA** (``aligned_50.pkl`` / ``unaligned_50.pkl``): ``{"train"|"valid"|"test": {"id", "raw_text", "text"
  (N, Tt, Dt), "text_bert" (N, 3, Tt) optional, "audio" (N, Ta, Da), "vision" (N, Tv, Dv), "audio_lengths",
  "vision_lengths" (unaligned), "regression_labels", "classification_labels", "regression_labels_T/A/V"}}``;
- **MMSA-FET** (one pickle for a whole corpus): the same arrays at the top level plus ``"mode"`` (split per
  sample);
- **MulT** (``*_data.pkl`` / ``*_data_noalign.pkl``): ``{"train"|"valid"|"test": {"text", "audio", "vision",
  "labels" (N, 1, 1), or (N, 4, 2) for IEMOCAP's four binary emotions, "id"}}``.

Valid steps: from ``*_lengths`` when given (MMSA unaligned); from the ``text_bert`` attention mask for text
(and for audio / vision in the aligned format, which share the text's word axis); otherwise every row that is
not all zeros (MulT pads with zero rows). ``-inf`` values (MulT audio) become 0, as MulT does. Visual features
go to ``video_feat.npy`` (there are no landmarks); time stamps are step indices (``meta["time_unit"]``).
dataset.json records each modality as features of the extractor ``imported`` (:func:`imported_contracts`), so
the training side reads them as it reads any extractor's.

Loading a pickle can run arbitrary code, so nothing is read without ``trust_pickle=True``
(``--trust-pickle``).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from extract.extractors.base import ExtractionError
from shards import Progress
from shards.contract import IMPORTED, ModalityContract, declare, declared_table
from shards.dataset import build_dataset, feature_set_hash, shard_name
from shards.io import ShardWriter, atomic_write_json
from shards.schema import MEMBERS, MODALITIES, SCHEMA_VERSION, SPLITS, MemberSpec, make_key
from shards.stats import RunningStats

SPLIT_ALIASES = {"train": "train", "valid": "valid", "dev": "valid", "val": "valid", "test": "test"}
ARRAYS = {"text": "text", "audio": "audio", "video": "vision"}
FEATURES = {"text": "text_feat.npy", "audio": "audio_feat.npy", "video": "video_feat.npy"}
MULT_EMOTIONS = ("neutral", "happy", "sad", "angry")


class FeatureImportError(ExtractionError):
    """A feature pickle cannot be imported; the message says what is missing or wrong."""


def load_pickle(path: Path, trust_pickle: bool) -> Any:
    if not trust_pickle:
        raise FeatureImportError(
            f"{path} is a Python pickle, and loading a pickle can run any code it contains; pass --trust-pickle "
            "if you trust where it came from"
        )
    try:
        with open(path, "rb") as f:
            return pickle.load(f)  # noqa: S301 - explicitly trusted by the user
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ModuleNotFoundError) as exc:
        raise FeatureImportError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def split_tables(obj: Any) -> tuple[str, dict[str, dict[str, Any]]]:
    """(format name, split -> table of per-sample arrays)."""
    if not isinstance(obj, Mapping):
        raise FeatureImportError(f"expected a dict at the top of the pickle, got {type(obj).__name__}")
    splits = {SPLIT_ALIASES[k]: v for k, v in obj.items() if k in SPLIT_ALIASES and isinstance(v, Mapping)}
    if splits:
        first = next(iter(splits.values()))
        return ("mult" if "labels" in first and "regression_labels" not in first else "mmsa"), splits
    if "mode" in obj:  # MMSA-FET: one table, split per sample
        modes = np.asarray(obj["mode"]).astype(str)
        n = len(modes)
        tables: dict[str, dict[str, Any]] = {}
        for split in SPLITS:
            idx = np.flatnonzero(np.array([SPLIT_ALIASES.get(m, m) == split for m in modes]))
            if len(idx):
                tables[split] = {k: _take(v, idx, n) for k, v in obj.items()}
        unknown = sorted(set(modes) - set(SPLIT_ALIASES))
        if unknown:
            raise FeatureImportError(f"unknown split names in 'mode': {unknown}; valid: {sorted(SPLIT_ALIASES)}")
        return "mmsa-fet", tables
    raise FeatureImportError(
        f"no train/valid/test tables and no 'mode' column; found keys {sorted(map(str, obj))}: is this an MMSA, "
        "MMSA-FET or MulT feature pickle?"
    )


def _take(value: Any, idx: np.ndarray, n: int) -> Any:
    arr = np.asarray(value) if not isinstance(value, np.ndarray) else value
    return arr[idx] if arr.ndim and len(arr) == n else value


def _valid_rows(x: np.ndarray) -> np.ndarray:
    """(T,) True for rows that are not all zero."""
    return np.abs(x).reshape(len(x), -1).sum(1) > 0


def _ids(table: Mapping[str, Any], n: int, split: str) -> list[tuple[str, str]]:
    raw = table.get("id")
    if raw is None:
        return [(split, str(i)) for i in range(n)]
    out = []
    for item in np.asarray(raw, dtype=object).reshape(n, -1):
        parts = [p.decode() if isinstance(p, bytes) else str(p) for p in item]
        if len(parts) == 1 and "$_$" in parts[0]:  # MMSA: "video_id$_$clip_id"
            parts = parts[0].split("$_$", 1)
        out.append((parts[0], "_".join(parts[1:]) or parts[0]))
    return out


def _labels(table: Mapping[str, Any], i: int, fmt: str) -> dict[str, Any]:
    if fmt == "mult":
        y = np.asarray(table["labels"][i], np.float64)
        if y.size == 1:
            return {"label": float(y.reshape(-1)[0])}
        pairs = y.reshape(-1, 2)  # IEMOCAP: one (no, yes) pair per emotion
        names = MULT_EMOTIONS if len(pairs) == 4 else [f"label_{k}" for k in range(len(pairs))]
        return {name: int(np.argmax(p)) for name, p in zip(names, pairs, strict=True)}
    out: dict[str, Any] = {}
    for src, dst in (("regression_labels", "label"), ("classification_labels", "classification"),
                     ("regression_labels_T", "label_T"), ("regression_labels_A", "label_A"),
                     ("regression_labels_V", "label_V")):  # fmt: skip
        if src in table:
            value = float(np.asarray(table[src][i]).reshape(-1)[0])
            out[dst] = int(value) if dst == "classification" else value
    return out


def _sample_arrays(table: Mapping[str, Any], i: int, aligned: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """modality -> (valid steps (T, D) float, token ids or None) for sample i."""
    bert = np.asarray(table["text_bert"][i]) if "text_bert" in table else None
    text_mask = bert[1].astype(bool) if bert is not None else None
    out = {}
    for m, key in ARRAYS.items():
        if key not in table:
            continue
        x = np.nan_to_num(np.asarray(table[key][i], np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        lengths = table.get(f"{key}_lengths")
        if lengths is not None and m != "text":
            valid = np.arange(len(x)) < int(np.asarray(lengths[i]))
        elif text_mask is not None and (m == "text" or aligned):
            valid = text_mask[: len(x)]
        else:
            valid = _valid_rows(x)
        ids = bert[0][: len(x)][valid].astype(np.int32) if (m == "text" and bert is not None) else None
        out[m] = (x[valid], ids)
    return out


def convert(
    tables: dict[str, dict[str, Any]],
    fmt: str,
    out: Path,
    source: Path,
    shard_size: int,
    progress: Progress | None = None,
) -> dict:
    """Write every split's samples as shards + sidecars, then dataset.json; return the dataset card.
    ``progress(samples written, samples in all)`` is called after each shard."""
    first = next(iter(tables.values()))
    aligned = fmt != "mult" and not any(f"{k}_lengths" in first for k in ARRAYS.values())
    present = [m for m in MODALITIES if ARRAYS[m] in first]
    dims = {}
    for m, sym in (("text", "Dt"), ("audio", "Da"), ("video", "Dv")):
        if m in present:
            dims[sym] = int(np.asarray(first[ARRAYS[m]]).shape[-1])
    feature_set = {
        "schema_version": SCHEMA_VERSION,
        "modalities": present,
        "imported": {
            "format": fmt,
            "aligned": aligned,
            "file": source.name,
            "sha256": _sha256(source),
            "dims": dims,
        },  # fmt: skip
        "extractors": {},
    }
    fs_hash = feature_set_hash(feature_set)
    all_ids = {split: _ids(table, len(np.asarray(table[ARRAYS[present[0]]])), split) for split, table in tables.items()}
    _check_unique(all_ids)
    out.mkdir(parents=True, exist_ok=True)
    planned, written, total = [], 0, sum(len(ids) for ids in all_ids.values())
    for split, table in tables.items():
        ids = all_ids[split]
        n = len(ids)
        for index, lo in enumerate(range(0, n, shard_size)):
            planned.append((split, index))
            rows = range(lo, min(n, lo + shard_size))
            _write_shard(out, split, index, rows, table, ids, fmt, aligned, present, dims, fs_hash)
            written += len(rows)
            if progress is not None:
                progress(written, total)
    contracts = imported_contracts(present, dims, {"format": fmt, "aligned": aligned})
    return build_dataset(out, planned, feature_set, extra={"imported_from": str(source)}, contracts=contracts)


def imported_outputs(modality: str) -> dict[str, MemberSpec]:
    """The members an imported modality's samples carry, by role: its features (required), token ids for text
    (where the pickle has them), a mask and step-index time stamps for audio and video."""
    names = [FEATURES[modality], *(["text_ids.npy"] if modality == "text" else [f"{modality}_mask.npy"])]
    names += [f"{modality}_time.npy"] if modality != "text" else []
    return {n: replace(MEMBERS[n], required=True) if n == FEATURES[modality] else MEMBERS[n] for n in names}


def imported_contracts(
    present: list[str], dims: dict[str, int], settings: dict[str, Any]
) -> dict[str, ModalityContract]:
    """dataset.json's record of each imported modality: features of the extractor ``imported``."""
    return {m: declare(m, IMPORTED, imported_outputs(m), dims, settings) for m in present}


def _check_unique(all_ids: dict[str, list[tuple[str, str]]]) -> None:
    seen: dict[str, list[str]] = {}
    for split, ids in all_ids.items():
        for video_id, clip_id in ids:
            seen.setdefault(make_key(video_id, clip_id), []).append(split)
    duplicates = [f"{key} ({', '.join(splits)})" for key, splits in seen.items() if len(splits) > 1]
    if duplicates:
        shown = "; ".join(duplicates[:5]) + (f"; and {len(duplicates) - 5} more" if len(duplicates) > 5 else "")
        raise FeatureImportError(f"duplicate sample ids: {shown}; every sample needs its own id")


def _write_shard(out, split, index, rows, table, ids, fmt, aligned, present, dims, fs_hash) -> None:
    name = shard_name(split, index)
    writer = ShardWriter(out / f"{name}.tar", members=declared_table({m: imported_outputs(m) for m in present}))
    stats: dict[str, RunningStats] = {}
    records = []
    members = FEATURES
    try:
        for i in rows:
            video_id, clip_id = ids[i]
            key = make_key(video_id, clip_id)
            arrays = _sample_arrays(table, i, aligned)
            mods, sample = {}, {"__key__": key}
            for m in MODALITIES:
                feat, ids_m = arrays.get(m, (np.zeros((0, 1)), None))
                if m not in present or len(feat) == 0:
                    mods[m] = {"status": "absent", "error": "not in the pickle" if m not in present else "no steps"}
                    continue
                mods[m] = {"status": "ok", "error": None, "steps": len(feat)}
                sample[members[m]] = feat.astype(np.float16)
                if m == "text" and ids_m is not None:
                    sample["text_ids.npy"] = ids_m
                if m in ("audio", "video"):
                    sample[f"{m}_mask.npy"] = np.ones(len(feat), bool)
                    sample[f"{m}_time.npy"] = np.arange(len(feat), dtype=np.float32)
                if split == "train":
                    stats.setdefault(members[m], RunningStats()).update(feat.astype(np.float64))
            raw_text = table.get("raw_text")
            sample["meta.json"] = {
                "schema_version": SCHEMA_VERSION, "key": key, "video_id": video_id, "clip_id": clip_id,
                "split": split, "modalities": mods, "feature_set_hash": fs_hash, "labels": _labels(table, i, fmt),
                "text": str(raw_text[i]) if raw_text is not None else None, "time_unit": "step", "row": int(i),
                "source": f"import-mmsa ({fmt})",
            }  # fmt: skip
            writer.write(sample)
            status = "ok" if all(mods[m]["status"] == "ok" for m in present) else "partial"
            records.append({"key": key, "video_id": video_id, "clip_id": clip_id, "split": split, "row": int(i),
                            "shard": f"{name}.tar", "status": status, "modalities": mods})  # fmt: skip
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    sidecar = {
        "schema_version": SCHEMA_VERSION, "shard": f"{name}.tar", "split": split, "index": index, "rank": 0,
        "feature_set_hash": fs_hash, "planned": [r["key"] for r in records], "keys": writer.keys,
        "digests": writer.digests, "bytes": (out / f"{name}.tar").stat().st_size, "clips": records, "dims": dims,
        "stats": {k: v.to_json() for k, v in stats.items()}, "timings": {}, "audio_seconds": 0.0,
    }  # fmt: skip
    atomic_write_json(out / f"{name}.json", sidecar)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def import_mmsa(
    pickle_path: Path | str,
    out: Path | str,
    trust_pickle: bool = False,
    shard_size: int = 256,
    progress: Progress | None = None,
) -> dict:
    """Convert an MMSA / MMSA-FET / MulT feature pickle into a shard directory; returns dataset.json.
    ``progress(samples written, samples in all)`` is called after each shard."""
    pickle_path, out = Path(pickle_path), Path(out)
    if not pickle_path.is_file():
        raise FeatureImportError(f"{pickle_path} not found")
    if out.exists() and any(out.iterdir()):
        raise FeatureImportError(f"{out} is not empty; choose a new --out directory")
    fmt, tables = split_tables(load_pickle(pickle_path, trust_pickle))
    return convert(tables, fmt, out, pickle_path, shard_size, progress)


__all__ = ["FeatureImportError", "import_mmsa"]
