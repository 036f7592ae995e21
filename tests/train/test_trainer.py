"""Training on the bundled shards: outputs, resume equality, end-to-end vs frozen encoders, refusals, CLI."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from mmfuse.cli import main
from shards.dataset import FeatureSetMismatch
from train.checkpoint import CheckpointError, load_checkpoint
from train.config import make_train_config
from train.logs import RunLog
from train.runtime import RunDirError
from train.trainer import clip_grad_norm_per_group, fit

FAST = ["batch_size=1", "num_workers=0", "log_every=1", "model.hidden=12", "model.num_heads=3", "device=cpu"]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_frozen_run_writes_every_output(bundled_dataset: Path, tmp_path: Path) -> None:
    config = make_train_config("late", overrides=[*FAST, "epochs=2"])
    final = fit(config, bundled_dataset, tmp_path / "run")
    run = tmp_path / "run"
    for name in (
        "config.json",
        "metrics.jsonl",
        "curves.png",
        "final.json",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
    ):
        assert (run / name).is_file(), name
    assert any((run / "events").iterdir())
    assert set(losses(run)) == {1, 2, 3, 4}  # 2 train clips, batch 1, 2 epochs
    assert final["selected_by"] == "valid mae"
    assert final["test"]["n"] == 1 and final["valid"]["n"] == 1
    assert final["valid"]["grad_share/task"] == 1.0  # late fusion's only loss term carries all the gradient
    assert {"diag/loss/text", "diag/loss/audio", "diag/loss/video"} <= set(final["valid"])
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["model"] == "late" and len(record["feature_set_hash"]) == 16
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["state"]["step"] == 4 and ckpt["state"]["epoch"] == 2 and ckpt["dims"]["video"] == 478 * 3 + 4
    with pytest.raises(RunDirError, match="already exists and is not empty; pass --resume"):
        fit(config, bundled_dataset, run)


class Interrupt(Exception):
    pass


def test_resume_gives_the_same_losses(bundled_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    config = make_train_config("late", overrides=[*FAST, "epochs=3", "checkpoint_every=1", "model.dropout=0.3"])
    fit(config, bundled_dataset, tmp_path / "straight")
    expected = losses(tmp_path / "straight")
    assert len(expected) == 6

    original = RunLog.train

    def stop_at_step_4(self, step, *args):  # dies before step 4 is logged; last.pt holds step 3 (mid-epoch)
        if step == 4:
            raise Interrupt()
        return original(self, step, *args)

    monkeypatch.setattr(RunLog, "train", stop_at_step_4)
    with pytest.raises(Interrupt):
        fit(config, bundled_dataset, tmp_path / "resumed")
    monkeypatch.setattr(RunLog, "train", original)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["state"]["step"] == 3
    fit(config, bundled_dataset, tmp_path / "resumed", resume=True)
    got = losses(tmp_path / "resumed")
    assert got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def test_too_few_samples_for_one_step_is_an_error(bundled_dataset: Path, tmp_path: Path) -> None:
    from train.inputs import DataError

    config = make_train_config("late", overrides=[*FAST, "batch_size=4"])
    with pytest.raises(DataError, match="gives 0 full batch\\(es\\) of 4 per rank .* lower batch_size"):
        fit(config, bundled_dataset, tmp_path / "run")


def test_a_label_key_no_sample_has_is_an_error(bundled_dataset: Path, tmp_path: Path, capsys) -> None:
    from train.inputs import DataError

    config = make_train_config("late", overrides=[*FAST, "label_key=sentimnet"])
    with pytest.raises(DataError, match="no sample of the train split .* has a label under label_key='sentimnet'"):
        fit(config, bundled_dataset, tmp_path / "run")
    code = main(["train", "--shards", str(bundled_dataset), "--model", "late", "--run-dir", str(tmp_path / "cli")]
                + [*FAST, "task=multilabel", "label_key=happy,sad"])  # fmt: skip
    assert code == 1
    assert "has a label under label_key='happy,sad' (task=multilabel)" in capsys.readouterr().err


def test_resume_without_a_checkpoint_is_refused(bundled_dataset: Path, tmp_path: Path) -> None:
    config = make_train_config("late", overrides=FAST)
    with pytest.raises(RunDirError, match="last.pt not found; start a new run without --resume"):
        fit(config, bundled_dataset, tmp_path / "nothing", resume=True)


def test_run_stopped_before_its_first_checkpoint_resumes_from_step_0(
    bundled_dataset: Path, tmp_path: Path, monkeypatch
) -> None:
    """Ctrl-C before any checkpoint leaves config.json and a few log lines: --resume starts the run again in the
    same directory (a new run there would be refused as not empty), and the log holds each step once."""
    config = make_train_config("late", overrides=[*FAST, "epochs=2"])
    original = RunLog.train

    def stop_at_step_2(self, step, *args):
        if step == 2:
            raise KeyboardInterrupt
        return original(self, step, *args)

    monkeypatch.setattr(RunLog, "train", stop_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        fit(config, bundled_dataset, tmp_path / "run")
    monkeypatch.setattr(RunLog, "train", original)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists() and set(losses(tmp_path / "run")) == {1}
    with pytest.raises(RunDirError, match="not empty; pass --resume"):
        fit(config, bundled_dataset, tmp_path / "run")
    fit(config, bundled_dataset, tmp_path / "run", resume=True)
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]  # fmt: skip
    assert steps == [1, 2, 3, 4]


def encoder_params(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def test_end_to_end_fine_tunes_encoders_and_frozen_does_not(bundled_dataset: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    e2e = make_train_config("late", overrides=[*FAST, "epochs=1", "mode=end_to_end", "encoder_lr=0.01"])
    fit(e2e, bundled_dataset, tmp_path / "e2e")
    state = load_checkpoint(tmp_path / "e2e" / "checkpoints" / "last.pt")["model"]
    provenance = json.loads((bundled_dataset / "dataset.json").read_text())["feature_set"]["extractors"]
    text = AutoModel.from_pretrained(provenance["text"]["model"])
    before = text.state_dict()
    after = encoder_params(state, "encoders.text.model.")
    assert after, "the checkpoint holds the fine-tuned text encoder"
    changed = [k for k, v in after.items() if not torch.equal(v, before[k[len("encoders.text.model.") :]])]
    assert any("encoder.layer.0" in k for k in changed)
    assert encoder_params(state, "encoders.audio.")
    from train.predict import load_network

    _, net = load_network(load_checkpoint(tmp_path / "e2e" / "checkpoints" / "last.pt"))  # shapes checked first
    torch.testing.assert_close(net.state_dict()["encoders.text.model." + changed[0][len("encoders.text.model.") :]],
                               state[changed[0]])  # fmt: skip

    frozen = make_train_config("late", overrides=[*FAST, "epochs=1"])
    fit(frozen, bundled_dataset, tmp_path / "frozen")
    state = load_checkpoint(tmp_path / "frozen" / "checkpoints" / "last.pt")["model"]
    assert not encoder_params(state, "encoders.")  # frozen mode trains on the stored features only


def test_unfreeze_schedule_and_top_k(bundled_dataset: Path, tmp_path: Path) -> None:
    provenance = json.loads((bundled_dataset / "dataset.json").read_text())["feature_set"]["extractors"]
    from train.encoders import AudioEncoder

    reference = AudioEncoder(provenance["audio"]).state_dict()
    late = make_train_config("late", overrides=[*FAST, "epochs=1", "mode=end_to_end", "unfreeze_after=100"])
    fit(late, bundled_dataset, tmp_path / "late")
    state = encoder_params(load_checkpoint(tmp_path / "late" / "checkpoints" / "last.pt")["model"], "encoders.audio.")
    assert all(torch.equal(v, reference[k[len("encoders.audio.") :]]) for k, v in state.items())

    top = make_train_config(
        "late", overrides=[*FAST, "epochs=1", "mode=end_to_end", "unfreeze_top_k=1", "encoder_lr=0.01"]
    )
    fit(top, bundled_dataset, tmp_path / "top")
    state = encoder_params(load_checkpoint(tmp_path / "top" / "checkpoints" / "last.pt")["model"], "encoders.audio.")
    moved = {k for k, v in state.items() if not torch.equal(v, reference[k[len("encoders.audio.") :]])}
    assert moved and all(".encoder.layers.1." in k for k in moved)  # only the top of the 2 layers trains


def test_feature_set_mismatch_is_refused(bundled_dataset: Path, tmp_path: Path, capsys) -> None:
    config = make_train_config("late", overrides=[*FAST, "epochs=1"])
    fit(config, bundled_dataset, tmp_path / "run")
    other = tmp_path / "other"
    shutil.copytree(bundled_dataset, other)
    ds = json.loads((other / "dataset.json").read_text())
    ds["feature_set_hash"] = "0" * 16
    (other / "dataset.json").write_text(json.dumps(ds))
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    assert main(["eval", "--checkpoint", str(ckpt), "--shards", str(other)]) == 1
    err = capsys.readouterr().err
    assert "feature set" in err and "0000000000000000" in err
    with pytest.raises(FeatureSetMismatch):
        fit(config, other, tmp_path / "run", resume=True)


def test_eval_cli_json_and_missing_modalities(bundled_dataset: Path, tmp_path: Path, capsys) -> None:
    config = make_train_config("late", overrides=[*FAST, "epochs=1"])
    fit(config, bundled_dataset, tmp_path / "run")
    ckpt = str(tmp_path / "run" / "checkpoints" / "best.pt")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", ckpt, "--shards", str(bundled_dataset), "--split", "train", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = {"mae", "corr", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7", "n", "split"}
    assert expected <= set(result) and result["n"] == 2 and result["split"] == "train"
    assert main(["eval", "--checkpoint", ckpt, "--shards", str(bundled_dataset), "--json"]) == 0
    single = json.loads(capsys.readouterr().out)  # standard JSON: one test sample has no correlation -> null
    assert single["n"] == 1 and single["corr"] is None
    assert main(["eval", "--checkpoint", ckpt, "--shards", str(bundled_dataset), "--missing", "all", "--json"]) == 0
    every = json.loads(capsys.readouterr().out)["missing"]
    assert set(every) == {"none", "t", "a", "v", "ta", "tv", "av"}
    assert main(["eval", "--checkpoint", ckpt, "--shards", str(bundled_dataset), "--missing", "tav"]) == 1
    assert "removes every modality" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--shards", str(bundled_dataset)]) == 1
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not a split name: a usage error (an absent split: test_honest.py)
        main(["eval", "--checkpoint", ckpt, "--shards", str(bundled_dataset), "--split", "tset"])
    assert "invalid choice: 'tset'" in capsys.readouterr().err


def test_eval_writes_one_prediction_row_per_sample(bundled_dataset: Path, tmp_path: Path, capsys) -> None:
    config = make_train_config("late", overrides=[*FAST, "epochs=1"])
    fit(config, bundled_dataset, tmp_path / "run")
    ckpt, out = str(tmp_path / "run" / "checkpoints" / "best.pt"), tmp_path / "pred.csv"
    argv = ["eval", "--checkpoint", ckpt, "--shards", str(bundled_dataset), "--split", "train", "--json"]
    assert main([*argv, "--predictions", str(out)]) == 0
    reported = json.loads(capsys.readouterr().out)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["key", "split", "removed", "label", "prediction"]
    assert sorted(r["key"] for r in rows) == ["grid__bbaf2n", "grid__pwij3p"]
    assert {r["split"] for r in rows} == {"train"} and {r["removed"] for r in rows} == {"none"}
    labels = {r["key"]: float(r["label"]) for r in rows}
    assert labels == {"grid__bbaf2n": -1.5, "grid__pwij3p": -0.5}  # bundled_rows(): label i - 1.5
    mae = sum(abs(float(r["prediction"]) - float(r["label"])) for r in rows) / len(rows)
    assert mae == pytest.approx(reported["mae"], abs=1e-6)
    assert main([*argv, "--missing", "all", "--predictions", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * 7 and {r["removed"] for r in rows} == {"none", "t", "a", "v", "ta", "tv", "av"}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the refused file is a pickle on purpose
def test_checkpoints_never_unpickle(tmp_path: Path) -> None:
    import pickle

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"mmfuse_checkpoint": 1, "x": print}))
    with pytest.raises(CheckpointError, match="refused to read checkpoint .*evil.pt: it is not made only of tensors"):
        load_checkpoint(path)


def test_a_checkpoint_carrying_code_is_refused_without_advice_to_run_it(tmp_path: Path, capsys) -> None:
    """torch's refusal advises retrying with weights_only=False (or allowlisting the global): for a hostile file
    that runs its code. The refusal is one line that names the file and what it carries, and gives no such advice."""
    import os

    path = tmp_path / "hostile.pt"
    torch.save({"mmfuse_checkpoint": 1, "model": {}, "hook": os.system}, path)  # a global: code when unpickled
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"refused to read checkpoint {path}: it is not made only of tensors and plain values")
    assert "GLOBAL posix.system" in message and "\n" not in message
    for advice in ("weights_only=False", "weights_only", "add_safe_globals", "safe_globals", "allowlist"):
        assert advice not in message
    assert main(["eval", "--checkpoint", str(path), "--shards", str(tmp_path), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mmfuse eval: error: {message}"]


def test_tcmax_checkpoint_from_before_the_regression_setting_still_evaluates(
    bundled_dataset: Path, tmp_path: Path, capsys
) -> None:
    """A TCMax checkpoint written before ``regression`` existed was trained with the plain bins: it is rebuilt so."""
    config = make_train_config("tcmax", overrides=[*FAST, "epochs=1", "model.regression=bins"])
    fit(config, bundled_dataset, tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    del ckpt["model_config"]["regression"], ckpt["config"]["model.regression"]
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    assert load_checkpoint(old)["config"]["model.regression"] == "bins"
    argv = ["eval", "--checkpoint", str(old), "--shards", str(bundled_dataset), "--split", "train", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2


def test_eval_measures_the_mechanism_and_reads_a_renamed_setting(bundled_dataset: Path, tmp_path: Path, capsys) -> None:
    """Every evaluation carries each loss term's gradient share and the model's diagnostics; a checkpoint saved
    with TCMax's former ``regression=gaussian`` loads as ``constant_normaliser`` (the same network)."""
    config = make_train_config("tcmax", overrides=[*FAST, "epochs=1", "model.regression=constant_normaliser"])
    final = fit(config, bundled_dataset, tmp_path / "run")
    shares = {k: v for k, v in final["valid"].items() if k.startswith("grad_share/")}
    assert set(shares) == {"grad_share/positive", "grad_share/product_negative", "grad_share/joint_negative"}
    assert sum(shares.values()) == pytest.approx(1.0) and shares["grad_share/joint_negative"] == 0.0
    assert {"diag/tc", "diag/dv_joint", "diag/ce/fused"} <= set(final["valid"])
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    ckpt["model_config"]["regression"] = ckpt["config"]["model.regression"] = "gaussian"
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    argv = ["eval", "--checkpoint", str(old), "--shards", str(bundled_dataset), "--split", "valid", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["mae"] == pytest.approx(final["valid"]["mae"], abs=1e-6)


def test_gradient_accumulation_matches_one_big_batch(bundled_dataset: Path, tmp_path: Path) -> None:
    common = [*FAST, "epochs=1", "model.dropout=0.0", "clip_norm=0", "schedule=constant"]
    fit(make_train_config("late", overrides=[*common, "batch_size=2"]), bundled_dataset, tmp_path / "big")
    fit(make_train_config("late", overrides=[*common, "grad_accum=2"]), bundled_dataset, tmp_path / "accum")
    big = load_checkpoint(tmp_path / "big" / "checkpoints" / "last.pt")
    accum = load_checkpoint(tmp_path / "accum" / "checkpoints" / "last.pt")
    assert big["state"]["step"] == accum["state"]["step"] == 1
    for key, value in big["model"].items():
        # Attention's key bias has no true gradient (softmax ignores a shift shared by all keys): its gradient
        # is rounding noise, which Adam's normalisation turns into full-size steps of either sign.
        if not key.endswith("in_proj_bias"):
            torch.testing.assert_close(accum["model"][key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_seeds_give_a_mean_std_table(bundled_dataset: Path, tmp_path: Path, capsys) -> None:
    argv = ["train", "--shards", str(bundled_dataset), "--model", "late", "--run-dir", str(tmp_path / "seeds")]
    assert main([*argv, "--seeds", "1,2", *FAST, "epochs=1"]) == 0
    runs = json.loads((tmp_path / "seeds" / "seeds.json").read_text())
    assert set(runs) == {"1", "2"}
    assert json.loads((tmp_path / "seeds" / "seed-2" / "config.json").read_text())["config"]["run.seed"] == 2
    maes = [runs[s]["test"]["mae"] for s in ("1", "2")]
    table = (tmp_path / "seeds" / "seeds.md").read_text()
    mean, std = sum(maes) / 2, abs(maes[0] - maes[1]) / 2**0.5
    assert f"| mae | {mean:.4f} ± {std:.4f} |" in table
    assert "seeds 1, 2" in capsys.readouterr().out


def test_bad_sample_stops_training_unless_skipped(bundled_dataset: Path, tmp_path: Path, capsys) -> None:
    import tarfile

    shards = tmp_path / "shards"
    shutil.copytree(bundled_dataset, shards)
    src = shards / "train-000000.tar"
    dst = tmp_path / "rewritten.tar"
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read()
            if info.name == "grid__bbaf2n.audio_feat.npy":
                data = b"\x93NUMPY garbage"
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    dst.replace(src)
    argv = ["train", "--shards", str(shards), "--model", "late", *FAST, "epochs=1"]
    assert main([*argv, "--run-dir", str(tmp_path / "strict")]) == 1
    err = capsys.readouterr().err
    assert "train-000000.tar" in err and "audio_feat.npy" in err
    assert main([*argv, "--run-dir", str(tmp_path / "lenient"), "--skip-bad-samples"]) == 0
    records = [json.loads(line) for line in (tmp_path / "lenient" / "metrics.jsonl").read_text().splitlines()]
    assert [r["count"] for r in records if r["kind"] == "skipped"] == [1]


def test_gradient_checkpointing_gives_the_same_training(bundled_dataset: Path, tmp_path: Path) -> None:
    common = [*FAST, "epochs=1", "mode=end_to_end", "encoder_lr=0.01"]
    fit(make_train_config("late", overrides=common), bundled_dataset, tmp_path / "plain")
    fit(make_train_config("late", overrides=[*common, "grad_checkpointing=true"]), bundled_dataset, tmp_path / "ckpt")
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)
    plain = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")["model"]
    checkpointed = load_checkpoint(tmp_path / "ckpt" / "checkpoints" / "last.pt")["model"]
    for key, value in plain.items():
        if key.startswith("encoders.") and not key.endswith("in_proj_bias"):
            torch.testing.assert_close(checkpointed[key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_each_group_is_clipped_on_its_own() -> None:
    weights, biases, head, club = (torch.nn.Parameter(torch.zeros(n)) for n in (2, 1, 2, 2))
    groups = [("fusion.model", weights), ("fusion.model.no_decay", biases), ("head", head), ("fusion.club", club)]
    optimizer = torch.optim.SGD([{"name": name, "params": [p]} for name, p in groups], lr=0.1)
    weights.grad, biases.grad = torch.tensor([1.2, 0.0]), torch.tensor([1.6])  # one group (a decay split), norm 2
    head.grad = torch.tensor([0.3, 0.4])  # norm 0.5: under the limit
    club.grad = torch.tensor([300.0, 400.0])  # norm 500, like a CLUB q's likelihood gradient
    total = clip_grad_norm_per_group(optimizer, 1.0)
    assert float(total) == pytest.approx((2.0**2 + 0.5**2 + 500.0**2) ** 0.5)  # the pre-clip norm, for the log
    # one global norm would have scaled every gradient by 1/500; per group, the huge one shrinks only itself
    torch.testing.assert_close(head.grad, torch.tensor([0.3, 0.4]))
    torch.testing.assert_close(club.grad, torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(weights.grad, torch.tensor([0.6, 0.0]))  # the split is clipped as one group: x 1/2
    torch.testing.assert_close(biases.grad, torch.tensor([0.8]))


@pytest.mark.parametrize("model", ["late", "tcmax", "bc_pmjrs"])
def test_checkpoint_sizes_that_do_not_fit_its_weights_are_refused_before_building(
    bundled_dataset: Path, tmp_path: Path, model: str
) -> None:
    """A checkpoint whose recorded dims or model settings describe a far larger network than its weights is
    refused from shapes alone (built on the meta device), naming the layer, before any memory is taken."""
    import resource

    from train.predict import load_network

    fit(make_train_config(model, overrides=[*FAST, "epochs=1"]), bundled_dataset, tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    config, net = load_network(ckpt)  # the untouched checkpoint loads
    assert isinstance(net, torch.nn.Module)
    wide = dict(ckpt, dims={**ckpt["dims"], "text": 10_000_000})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=r"do not fit the network .*fusion\..*text.*10000000"):
        load_network(wide)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing near 2.5 GB
    deep = dict(ckpt, config={**ckpt["config"], "model.hidden": 3000})
    with pytest.raises(CheckpointError, match="do not fit the network"):
        load_network(deep)
