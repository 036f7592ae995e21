"""``mmfuse predict``: one raw clip through exactly the checkpoint's extraction pipeline and network.

The extraction settings are rebuilt from what the checkpoint records: per modality the registered extractor and
the settings of its section (dataset.json's ``modalities`` records), and the feature set's modalities, fps and
precision; the extractors are loaded, and the feature set they describe must hash to the
checkpoint's ``feature_set_hash`` — otherwise (e.g. the local weights differ) prediction is refused naming
what differs. The clip is decoded and encoded as ``mmfuse extract`` would, its sample members are built in
memory (no shard is written), then the training stages ToInputs → collate → Normalise feed the network.
A modality the clip lacks (no transcript, no audio stream, no face) is masked, never fatal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract import extract_clip
from extract.clip import ASR
from extract.config import ExtractConfig, make_config
from extract.devices import resolve_device
from extract.extractors.base import section_name
from extract.manifest import Clip
from extract.pipeline import build_extractors, check_device, describe_feature_set
from extract.registry import EXTRACTORS, registered_as
from shards.contract import ModalityContract
from shards.dataset import FeatureSetMismatch, feature_set_hash
from shards.schema import MODALITIES, SAMPLE_RATE, make_key, validate_sample
from train.batches import Normalise, collate
from train.checkpoint import CheckpointError, checkpoint_dataset, load_checkpoint
from train.config import TrainConfig, make_train_config
from train.inputs import DataError, has_video_geom
from train.pipeline import FusionPipeline, check_token_ids
from train.runtime import amp_dtype
from train.stages import SelectModalities, ToInputs

NO_TEXT = "no transcript given (pass --text)"


def feature_set_diff(expected: Mapping[str, Any], got: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two feature-set dicts, e.g. ``extractors.text.weights_sha256``.

    Nested dicts are compared key by key; a key present on one side only counts as differing.
    """
    out = []
    for key in sorted(set(expected) | set(got)):
        a, b = expected.get(key, "<absent>"), got.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += feature_set_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, "<absent>") if isinstance(tree, Mapping) else "<absent>"
    return tree


def extract_config(
    feature_set: Mapping[str, Any], device: str = "cpu", contracts: Mapping[str, ModalityContract] | None = None
) -> ExtractConfig:
    """The extraction settings that reproduce ``feature_set`` (dataset.json's description) for one clip: per
    modality the registered extractor its record (``contracts``, dataset.json's ``modalities``; without one, the
    feature set's provenance) names, with the settings of its section the record holds (older records by their
    flat names, older feature sets by the provenance), and the feature set's modalities, frame rate, precision and
    speech recogniser."""
    contracts = contracts or {}
    ex = feature_set.get("extractors", {})
    fps = feature_set.get("fps")
    modalities = tuple(feature_set.get("modalities") or MODALITIES)
    settings: dict[str, Any] = {
        "modalities": modalities,
        "fps": fps if isinstance(fps, (int, float)) else None,
        "workers": 0,
        "batch_size": 1,
        # the shards' encoder precision (fp32 unless recorded), not this device's default: it is in the hash
        "precision": next(
            (e["precision"] for e in ex.values() if isinstance(e, Mapping) and e.get("precision")), "fp32"
        ),
        "raw": True,  # in memory only; end-to-end checkpoints need the waveform
        "device": device,
    }
    for m in modalities:
        record, provenance = contracts.get(m), ex.get(m) or {}
        name = record.extractor if record is not None else provenance.get("name")
        key = registered_as(name, m)
        if key is not None:  # else the feature-set check names the extractor that differs
            settings[f"extractors.{m}"] = key
            settings.update(recorded_section(key, {**provenance, **(record.settings if record else {})}))
    audio = ex.get("audio", {})
    if audio.get("chunk_samples") and "audio.chunk_s" not in settings:  # feature sets before chunk_s was recorded
        settings["audio.chunk_s"] = audio["chunk_samples"] / audio.get("sample_rate", SAMPLE_RATE)
    asr = feature_set.get(ASR)
    if asr:  # the shards' transcripts came from speech recognition: a clip without --text is transcribed too
        settings.update(recorded_section(ASR, asr))
    return make_config(None, **settings)


def recorded_section(key: str, recorded: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of the section of extractor ``key`` that ``recorded`` (its record's ``settings``, or its
    provenance) holds, by dotted key: its own ``Settings`` fields, by their names or older flat ones."""
    settings_type = EXTRACTORS[key].load().Settings
    own = {f.name for f in fields(settings_type) if f.metadata.get("setting", True)}
    names = {
        **{a: t for a, t in getattr(settings_type, "SETTING_ALIASES", {}).items() if t in own},
        **{n: n for n in own},
    }
    section = section_name(key)
    return {f"{section}.{names[k]}": v for k, v in recorded.items() if k in names and v is not None}


def matching_extractors(ckpt: Mapping[str, Any], cfg: ExtractConfig) -> tuple[dict[str, Any], str]:
    """Load the extractors of ``cfg`` and check that they describe the checkpoint's feature set.

    Returns the extractors and the feature-set hash; raises :class:`FeatureSetMismatch` naming both hashes
    and the differing fields otherwise.
    """
    check_device(cfg.device)
    extractors = build_extractors(cfg)
    here = describe_feature_set(cfg, extractors)
    got, expected = feature_set_hash(here), ckpt["feature_set_hash"]
    if got == expected:
        return extractors, got
    recorded = ckpt.get("feature_set", {})
    diff = feature_set_diff(recorded, here)
    if diff:
        shown = "; ".join(f"{k}: {_lookup(recorded, k)!r} (checkpoint) vs {_lookup(here, k)!r} (here)" for k in diff)
        why = f"differing fields: {shown}"
    else:
        why = "the checkpoint's own feature_set record does not hash to its feature_set_hash (altered or corrupt)"
    raise FeatureSetMismatch(
        f"feature-set mismatch: the checkpoint expects features {expected} but this machine's extractors give "
        f"{got}; {why}. Provide the same models (weights) the checkpoint was trained with."
    )


def extract_sample(
    video: Path,
    text: str | None,
    cfg: ExtractConfig,
    extractors: dict[str, Any],
    fs_hash: str,
    used: tuple,
    window: tuple[float | None, float | None] = (None, None),
) -> dict[str, Any]:
    """Decode and encode one clip as extraction does (:func:`extract.extract_clip`); return the shard sample dict
    (members as arrays), with the modalities the model does not use, and a text not given (``text=None``)
    without speech recognition, recorded absent. ``window``: the clip's ``(start, end)`` in the file, seconds
    (the manifest's columns; ``None``: the file's own).
    """
    video = Path(video)
    clip = Clip(
        key=make_key(video.resolve().parent.name, video.stem), video_id=video.resolve().parent.name,
        clip_id=video.stem, split="test", text=text or "", row=0, path=video.resolve(), media=str(video),
        start=window[0], end=window[1],
    )  # fmt: skip
    if text is not None:  # a given transcript is used as is; extraction recognises only empty ones
        extractors = {k: e for k, e in extractors.items() if k != "asr"}
    no_text = "text" in used and text is None and "asr" not in extractors
    sample = extract_clip(clip, cfg, extractors, fs_hash, [m for m in used if not (m == "text" and no_text)])
    mods = sample["meta.json"]["modalities"]
    for m in MODALITIES:
        if m not in used:
            mods[m] = {"status": "absent", "error": "not used by the model"}
    if no_text:
        mods["text"] = {"status": "absent", "error": NO_TEXT}
    return sample


def load_network(ckpt: Mapping[str, Any], device: str = "cpu") -> tuple[TrainConfig, FusionPipeline]:
    """The checkpoint's training config and network (eval mode, on ``device``, a resolved device name); also
    what ``mmfuse eval`` scores."""
    config = make_train_config(ckpt["model_name"], None, ["num_workers=0", f"device={device}"], base=ckpt["config"])
    check_state_shapes(config, ckpt)
    net = FusionPipeline(config, ckpt["dims"], checkpoint_dataset(ckpt))
    net.load_state_dict(ckpt["model"])
    return config, net.to(device).eval()


def check_state_shapes(config: TrainConfig, ckpt: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose recorded sizes (dims, model settings) do not build the fusion model its weights
    fit, before anything is allocated: the fusion model is first built on the meta device (shapes only, no
    memory) and every parameter and buffer compared with the saved ``fusion.`` state. A few-MB file declaring a
    10-million-wide input would otherwise build gigabytes of layers before the mismatch shows. (The end-to-end
    encoders come from the local pretrained files the feature set names; ``load_state_dict`` checks them.)"""
    import fusion

    try:
        dims = {m: int(ckpt["dims"][m]) for m in config.data.modalities}
        with torch.device("meta"):
            meta = fusion.build_model(config.model, **config.model_kwargs(dims))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"the checkpoint's recorded sizes do not build a network: {exc}") from exc
    expected = {f"fusion.{k}": tuple(v.shape) for k, v in meta.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in ckpt["model"].items() if k.startswith("fusion.") and hasattr(v, "shape")}
    problems = [f"{k}: saved {saved[k]}, the settings build {expected[k]}" for k in expected if k in saved
                and saved[k] != expected[k]]  # fmt: skip
    problems += [f"{k}: missing from the saved weights" for k in expected if k not in saved]
    problems += [f"{k}: saved but not part of the network" for k in saved if k not in expected]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise CheckpointError(f"the checkpoint's weights do not fit the network its settings describe: {shown}")


def model_batch(sample: dict[str, Any], ckpt: Mapping[str, Any], config: TrainConfig) -> dict[str, Any]:
    """The training stages on one sample: select → ToInputs → collate → Normalise; a batch of B = 1.

    Returns per modality ``m`` (1, T, D) float32 and ``m_mask`` (1, T) bool (plus raw inputs end to end).
    """
    dataset = checkpoint_dataset(ckpt)
    geom = has_video_geom(dataset)
    modalities, raw = tuple(config.data.modalities), config.mode == "end_to_end"
    dims = {m: int(ckpt["dims"][m]) for m in modalities}
    contracts = dataset.contracts  # the checkpoint's records (or those its feature set implies)
    validate_sample(sample, members=dataset.members)
    to_inputs = ToInputs(modalities, dims, raw, config.data.label_key, geom, config.task == "multilabel", contracts)
    inputs = to_inputs(SelectModalities(modalities, raw, contracts)(sample))
    batch = Normalise.from_dataset(dataset, modalities, geom)(collate([inputs]))
    batch.pop("label")  # NaN: a new clip has no label
    return batch


def describe_prediction(output: torch.Tensor, task: str, names: Sequence[str] | None = None) -> dict[str, Any]:
    """One sample's network output → a readable prediction.

    ``output``: () or (1,) score (regression), (C,) logits (classification) or (K,) logits (multilabel).
    Regression follows MMSA: sentiment by sign, and the Acc-7 class round(clip(score, -3, 3)). Multilabel gives
    each label's sigmoid probability under its name (``names``, the label keys; default the index) and the
    labels predicted present (probability > 0.5, as the metrics count them).
    """
    out = output.detach().float().cpu().reshape(-1)
    if task == "regression":
        score = float(out[0])
        sentiment = "positive" if score > 0 else "negative" if score < 0 else "neutral"
        return {
            "task": task,
            "score": score,
            "sentiment": sentiment,
            "acc7_class": int(np.round(np.clip(score, -3, 3))),
        }
    if task == "classification":
        probs = torch.softmax(out, 0)
        return {"task": task, "class": int(probs.argmax()), "probabilities": [float(p) for p in probs]}
    names = [str(k) for k in range(len(out))] if names is None else list(names)
    if len(names) != len(out):
        raise DataError(f"{len(names)} label names ({', '.join(names)}) for {len(out)} multilabel outputs")
    probs = {name: float(p) for name, p in zip(names, torch.sigmoid(out), strict=True)}
    return {"task": task, "probabilities": probs, "labels": [name for name, p in probs.items() if p > 0.5]}


def check_window(video: Path, window: tuple[float | None, float | None], max_duration_s: float) -> None:
    """Refuse a window (``--start``, ``--end``) that holds nothing, or a clip longer than ``--max-duration``, before
    any model is loaded, naming predict's own options (extraction's skip names its ``--config`` and the manifest's
    start/end columns). A file that cannot be probed is left to extraction's own message."""
    from extract.decode import DecodeError, clip_window
    from extract.worker import probe_media

    start, end = window
    if end is not None and end <= (start or 0.0):
        raise DataError(f"--end {end:g} must be after --start ({start or 0:g} s)")
    try:
        p = probe_media(Path(video), max_duration_s)  # under the decode memory limit, in a child of its own
    except DecodeError:
        return
    if start is not None and p.end > 0 and start >= p.end:
        raise DataError(f"--start {start:g} is past the end of {video} ({p.end:.2f} s)")
    t0, t1 = clip_window(p, start, end)
    if t1 - t0 > max_duration_s:
        raise DataError(
            f"{video}: the clip is {t1 - t0:.0f} s long, over --max-duration {max_duration_s:g} (seconds); pass a "
            "larger --max-duration, or cut a part of it with --start and --end"
        )


@torch.no_grad()
def predict_clip(
    checkpoint: Path | str,
    video: Path | str,
    text: str | None = None,
    device: str = "cpu",
    window: tuple[float | None, float | None] = (None, None),
    max_duration_s: float | None = None,
) -> dict:
    """Predict one raw clip with a checkpoint on ``device`` (:func:`extract.devices.resolve_device`); the result is
    what ``mmfuse predict --json`` prints. ``window``: the clip's ``(start, end)`` in the file, seconds (``None``:
    the file's own); a clip longer than ``max_duration_s`` (default: extraction's ``max_duration_s``) is refused.
    The network scores in the precision :func:`train.trainer.evaluate` uses (the run's ``amp`` on this device), so
    a clip scores as its sample does in ``mmfuse eval``."""
    device = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    if ckpt["config"].get("data.align_words"):  # load_checkpoint gives the config by dotted keys
        raise DataError(
            f"{checkpoint} was trained on word-aligned features (align_words=true); predicting a single clip needs "
            "its word timings, which `mmfuse predict` does not take: evaluate such models with `mmfuse eval`"
        )
    cfg = extract_config(ckpt.get("feature_set", {}), device, checkpoint_dataset(ckpt).contracts)
    cfg = cfg if max_duration_s is None else replace(cfg, max_duration_s=max_duration_s)
    check_window(Path(video), window, cfg.max_duration_s)
    extractors, fs_hash = matching_extractors(ckpt, cfg)
    config, net = load_network(ckpt, device)
    sample = extract_sample(Path(video), text, cfg, extractors, fs_hash, tuple(config.data.modalities), window)
    batch = model_batch(sample, ckpt, config)
    check_token_ids(batch, net.text_vocab)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    autocast = amp_dtype(config.run.amp, torch.device(device))  # the precision `mmfuse eval` scores in here
    with torch.autocast(torch.device(device).type, dtype=autocast or torch.float32, enabled=autocast is not None):
        output = net(batch).prediction[0].float()
    mods = sample["meta.json"]["modalities"]
    return {
        "video": str(video),
        "prediction": describe_prediction(output, config.task, config.label_keys),
        "modalities": {m: mods[m] for m in config.data.modalities},
        "feature_set_hash": fs_hash,
        "model": ckpt["model_name"],
    }


def format_result(result: Mapping[str, Any]) -> str:
    """Human-readable lines for ``mmfuse predict`` without ``--json``."""
    p = result["prediction"]
    if p["task"] == "regression":
        head = f"score {p['score']:+.4f} ({p['sentiment']}; Acc-7 class {p['acc7_class']:+d})"
    elif p["task"] == "classification":
        probs = ", ".join(f"{i}: {v:.3f}" for i, v in enumerate(p["probabilities"]))
        head = f"class {p['class']} (softmax: {probs})"
    else:
        probs = ", ".join(f"{name}: {v:.3f}" for name, v in p["probabilities"].items())
        head = f"labels {', '.join(p['labels']) or '(none)'} (sigmoid: {probs})"
    lines = [f"{result['video']}: {head}", f"model {result['model']}, feature set {result['feature_set_hash']}"]
    for m, status in result["modalities"].items():
        note = "" if status["status"] == "ok" else f" ({status.get('error')}; masked)"
        if m == "video" and status["status"] == "ok" and "frames" in status:
            note = f" (face in {status.get('face_frames', 0)}/{status['frames']} frames)"
        lines.append(f"  {m}: {status['status']}{note}")
    return "\n".join(lines)
