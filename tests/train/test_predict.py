"""``mmfuse predict``: a raw clip through the checkpoint's extraction pipeline gives the shards' prediction."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mmfuse.cli import main
from shards.dataset import FeatureSetMismatch, feature_set_hash
from tests.conftest import MEDIA
from train.checkpoint import checkpoint_dataset, load_checkpoint
from train.config import make_train_config
from train.data import make_loader
from train.pipeline import FusionPipeline
from train.predict import extract_config, feature_set_diff, predict_clip
from train.trainer import fit

FAST = ["batch_size=1", "num_workers=0", "log_every=1", "model.hidden=12", "model.num_heads=3", "device=cpu"]
GRID = MEDIA / "grid" / "bbaf2n.mpg"
GRID_TEXT = "bin blue at f two now"
NOFACE = MEDIA / "faces" / "face_noface.mov"


@pytest.fixture(scope="module")
def checkpoint(bundled_dataset: Path, tmp_path_factory) -> Path:
    """A late-fusion model trained one epoch (frozen features) on the bundled shards."""
    run = tmp_path_factory.mktemp("predict") / "run"
    fit(make_train_config("late", overrides=[*FAST, "epochs=1"]), bundled_dataset, run)
    return run / "checkpoints" / "last.pt"


def shard_prediction(checkpoint: Path, shards: Path, split: str, key: str) -> float:
    """The trained network's prediction for sample ``key`` as read from the shards (the training pipeline)."""
    ckpt = load_checkpoint(checkpoint)
    config = make_train_config(ckpt["model_name"], None, ["num_workers=0", "device=cpu"], base=ckpt["config"])
    net = FusionPipeline(config, ckpt["dims"], checkpoint_dataset(ckpt))
    net.load_state_dict(ckpt["model"])
    net.eval()
    with torch.no_grad():
        for batch in make_loader(shards, split, dataclasses.replace(config.data, num_workers=0), train=False):
            if key in batch["key"]:
                return float(net(batch).prediction[batch["key"].index(key)])
    raise AssertionError(f"{key} not in split {split}")


def test_prediction_equals_the_shard_sample(checkpoint: Path, bundled_dataset: Path) -> None:
    expected = shard_prediction(checkpoint, bundled_dataset, "train", "grid__bbaf2n")
    result = predict_clip(checkpoint, GRID, GRID_TEXT)
    p = result["prediction"]
    assert p["task"] == "regression"
    assert p["score"] == pytest.approx(expected, abs=1e-3)
    assert p["sentiment"] == ("positive" if p["score"] > 0 else "negative")
    assert p["acc7_class"] == round(max(-3.0, min(3.0, p["score"])))
    assert {m: s["status"] for m, s in result["modalities"].items()} == {"text": "ok", "audio": "ok", "video": "ok"}
    assert result["feature_set_hash"] == load_checkpoint(checkpoint)["feature_set_hash"]


def test_missing_face_and_transcript_are_masked_as_in_the_shards(checkpoint: Path, bundled_dataset: Path) -> None:
    # face_noface.mov: no face in most frames, audio from 2.43 s; its manifest transcript is empty (text masked)
    expected = shard_prediction(checkpoint, bundled_dataset, "test", "faces__face_noface")
    result = predict_clip(checkpoint, NOFACE)
    assert result["prediction"]["score"] == pytest.approx(expected, abs=1e-3)
    mods = result["modalities"]
    assert mods["text"] == {"status": "absent", "error": "no transcript given (pass --text)"}
    assert mods["audio"]["status"] == "ok" and mods["audio"]["real_span"][0] == pytest.approx(2.43, abs=0.05)
    assert mods["video"]["status"] == "ok" and mods["video"]["face_frames"] < mods["video"]["frames"]


def test_cli_text_and_json_outputs(checkpoint: Path, capsys) -> None:
    assert main(["predict", "--checkpoint", str(checkpoint), str(GRID), "--text", GRID_TEXT, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"video", "prediction", "modalities", "feature_set_hash", "model"}
    assert result["video"] == str(GRID) and result["model"] == "late" and len(result["feature_set_hash"]) == 16
    score = result["prediction"]["score"]
    assert main(["predict", "--checkpoint", str(checkpoint), str(GRID), "--text", GRID_TEXT]) == 0
    out = capsys.readouterr().out
    assert f"score {score:+.4f}" in out and "text: ok" in out and "feature set " + result["feature_set_hash"] in out
    assert main(["predict", "--checkpoint", str(checkpoint), str(GRID)]) == 0  # no --text: text masked
    out = capsys.readouterr().out
    assert "score " in out and "text: absent (no transcript given (pass --text); masked)" in out


def test_altered_feature_set_hash_is_refused(checkpoint: Path, tmp_path: Path, capsys) -> None:
    ckpt = load_checkpoint(checkpoint)
    real = ckpt["feature_set_hash"]
    ckpt["feature_set_hash"] = "0123456789abcdef"
    torch.save(ckpt, tmp_path / "altered.pt")
    assert main(["predict", "--checkpoint", str(tmp_path / "altered.pt"), str(GRID), "--text", GRID_TEXT]) == 1
    err = capsys.readouterr().err
    assert "feature-set mismatch" in err and "0123456789abcdef" in err and real in err
    assert "does not hash to its feature_set_hash" in err


def test_other_weights_are_refused_naming_the_field(checkpoint: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(checkpoint)
    real = ckpt["feature_set_hash"]
    ckpt["feature_set"]["extractors"]["text"]["weights_sha256"] = "feedfacefeedface"
    ckpt["feature_set_hash"] = feature_set_hash(ckpt["feature_set"])
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(FeatureSetMismatch, match="extractors.text.weights_sha256: 'feedfacefeedface'") as info:
        predict_clip(tmp_path / "other.pt", GRID, GRID_TEXT)
    assert ckpt["feature_set_hash"] in str(info.value) and real in str(info.value)


def test_feature_set_diff_lists_nested_keys() -> None:
    a = {"fps": 25, "extractors": {"text": {"model": "x", "layer": -1}, "audio": {"model": "w"}}}
    b = {"fps": 25, "extractors": {"text": {"model": "y", "layer": -1}}, "sample_rate": 16000}
    assert feature_set_diff(a, b) == ["extractors.audio", "extractors.text.model", "sample_rate"]
    assert feature_set_diff(a, a) == []


def test_unreadable_video_and_missing_checkpoint_exit_1(checkpoint: Path, tmp_path: Path, capsys) -> None:
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n")
    assert main(["predict", "--checkpoint", str(checkpoint), str(fake), "--text", "hello"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (model-loading progress may come first)
    assert last.startswith("mmfuse predict: error: cannot decode") and "unreadable container notes.mp4" in last
    assert main(["predict", "--checkpoint", str(tmp_path / "none.pt"), str(GRID)]) == 1
    assert "not found" in capsys.readouterr().err


def test_device_flag_resolves_auto_and_refuses_a_missing_gpu(monkeypatch) -> None:
    from extract.devices import DeviceError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(DeviceError, match="CUDA is not available; use --device cpu or auto"):
        resolve_device("cuda:1")
    with pytest.raises(DeviceError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(DeviceError, match="has 2 GPU"):
        resolve_device("cuda:2")


def test_eval_and_predict_take_a_device(checkpoint: Path, bundled_dataset: Path, capsys, monkeypatch) -> None:
    evaluate = ["eval", "--checkpoint", str(checkpoint), "--shards", str(bundled_dataset), "--split", "train"]
    assert main([*evaluate, "--json", "--device", "cpu"]) == 0
    on_cpu = json.loads(capsys.readouterr().out)
    if not torch.cuda.is_available():  # auto is cpu here: the same numbers
        assert main([*evaluate, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == on_cpu
    predict = ["predict", "--checkpoint", str(checkpoint), str(GRID), "--text", GRID_TEXT, "--json"]
    assert main([*predict, "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["prediction"]["task"] == "regression"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command, args in (("eval", evaluate), ("predict", predict)):
        capsys.readouterr()
        assert main([*args, "--device", "cuda"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"mmfuse {command}: error: --device cuda was asked for but CUDA is not available; use --device cpu or auto"
        ]


@pytest.mark.gpu
def test_eval_and_predict_on_cuda_match_cpu(checkpoint: Path, bundled_dataset: Path, capsys) -> None:
    evaluate = ["eval", "--checkpoint", str(checkpoint), "--shards", str(bundled_dataset), "--split", "train", "--json"]
    scores = {}
    for device in ("cpu", "cuda"):
        assert main([*evaluate, "--device", device]) == 0
        scores[device] = json.loads(capsys.readouterr().out)
    assert scores["cuda"]["n"] == scores["cpu"]["n"]
    assert scores["cuda"]["mae"] == pytest.approx(scores["cpu"]["mae"], abs=1e-3)
    cpu = predict_clip(checkpoint, GRID, GRID_TEXT, "cpu")["prediction"]["score"]
    assert predict_clip(checkpoint, GRID, GRID_TEXT, "cuda")["prediction"]["score"] == pytest.approx(cpu, abs=1e-3)


def predict_options() -> set[str]:
    import re

    from mmfuse.cli import build_commands

    return set(re.findall(r"(?<![\w-])-{1,2}[\w][\w-]*", build_commands()[1].choices["predict"].format_usage()))


def test_predict_advice_names_only_options_it_has(checkpoint: Path, capsys) -> None:
    """A clip over the length limit was refused with extraction's advice ("raise it with --config or cut the clip
    with start/end columns"): predict has neither. Its messages name its own options, and those options work."""
    import re

    from train.commands import PREDICT_EXAMPLES
    from train.predict import NO_TEXT

    argv = ["predict", "--checkpoint", str(checkpoint), str(GRID), "--text", GRID_TEXT, "--device", "cpu"]
    assert main([*argv, "--max-duration", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mmfuse predict: error: {GRID}: the clip is 3 s long, over --max-dur")
    named = set(re.findall(r"--[a-z][a-z-]*", " ".join([err[0], NO_TEXT, PREDICT_EXAMPLES])))
    assert {"--max-duration", "--start", "--end", "--text"} <= named
    assert named <= predict_options()
    assert main([*argv, "--start", "1", "--end", "0.5"]) == 1
    assert "--end 0.5 must be after --start (1 s)" in capsys.readouterr().err
    assert main([*argv, "--max-duration", "2", "--start", "0.4", "--end", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["modalities"]["video"]["frames"] == 40  # 1.6 s at 25 fps
    with pytest.raises(SystemExit) as usage:
        main([*argv, "--start", "-1"])
    assert usage.value.code == 2
    assert "--start: '-1': seconds must be a finite number, 0 or more" in capsys.readouterr().err


def test_predict_scores_in_the_precision_eval_uses(checkpoint: Path, bundled_dataset: Path, monkeypatch) -> None:
    """On a GPU `mmfuse eval` scores under the run's AMP dtype (bf16 where native); predict scored in fp32, so a
    clip's score differed from its sample's. Both now take the dtype from ``train.runtime.amp_dtype``: with it
    forced to bf16 (autocast runs bf16 on the CPU too), predict matches the sample scored under bf16 autocast."""
    import train.predict

    fp32 = predict_clip(checkpoint, GRID, GRID_TEXT)["prediction"]["score"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = shard_prediction(checkpoint, bundled_dataset, "train", "grid__bbaf2n")
    monkeypatch.setattr(train.predict, "amp_dtype", lambda setting, device: torch.bfloat16)
    bf16 = predict_clip(checkpoint, GRID, GRID_TEXT)["prediction"]["score"]
    print(f"fp32 {fp32:.6f}, bf16 {bf16:.6f}, the sample under bf16 {expected:.6f}")
    assert bf16 == pytest.approx(expected, abs=2e-5) and abs(bf16 - fp32) > 1e-4


def test_predict_rebuilds_the_extraction_settings_the_checkpoint_records(checkpoint: Path, tiny_text_model) -> None:
    """Each modality's record names its extractor and holds its section's settings: predict reads them back (records
    written before the sections were, by their flat names), not a table of known fields."""
    ckpt = load_checkpoint(checkpoint)
    contracts = checkpoint_dataset(ckpt).contracts
    cfg = extract_config(ckpt["feature_set"], "cpu", contracts)
    assert (cfg.extractors.text, cfg.extractors.audio, cfg.extractors.video) == ("text", "audio", "facemesh")
    recorded = {m: {k: v for k, v in c.settings.items() if k not in ("batch_size", "precision", "raw")}
                for m, c in contracts.items()}  # fmt: skip
    assert recorded["text"] == {"model": str(tiny_text_model), "layer": -1, "max_tokens": cfg.text.max_tokens}
    assert (cfg.text.model, cfg.text.layer) == (str(tiny_text_model), -1)
    assert recorded["video"] == {"max_faces": 1, "min_detection_confidence": 0.5}
    assert (cfg.workers, cfg.batch_size, cfg.raw) == (0, 1, True)
    changed = {
        "text": dataclasses.replace(contracts["text"], settings={"text_model": "m/t", "text_layer": -3}),
        "video": dataclasses.replace(contracts["video"], settings={"max_faces": 4, "min_detection_confidence": 0.75}),
    }
    again = extract_config(ckpt["feature_set"], "cpu", {**contracts, **changed})
    provenance = ckpt["feature_set"]["extractors"]["text"]["max_tokens"]  # what a record without it leaves
    assert (again.text.model, again.text.layer, again.text.max_tokens) == ("m/t", -3, provenance)
    assert (again.facemesh.max_faces, again.facemesh.min_detection_confidence) == (4, 0.75)
