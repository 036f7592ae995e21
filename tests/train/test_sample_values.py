"""Labels inside samples that training cannot use (numbers float32 cannot hold, values that are not labels) are
refused where samples are validated, by the same rule as the manifest's, naming the sample and the label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmfuse.cli import main
from tests.train.test_data import make_sample, write_shards

FAST = ["batch_size=1", "num_workers=0", "log_every=1", "model.hidden=12", "model.num_heads=3", "device=cpu"]


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_labels_the_schema_refuses_stop_verify_and_training(tmp_path: Path, capsys) -> None:
    """A 401-digit label (train used to die with OverflowError), one float32 makes inf (silently unlabelled), a
    list of labels (train died with an AttributeError while verify said OK): the schema's rule for ``labels`` is
    the manifest's, and verify and training both refuse the sample, naming it and the label."""
    rng = np.random.default_rng(3)
    special = {}
    for key, labels in (
        ("train0__c0", {"label": 10**400}),
        ("train0__c2", [0.5, 1]),
        ("valid0__c0", {"label": 3.5e38}),
    ):
        special[key] = make_sample(key, key[:5], rng)
        special[key]["meta.json"]["labels"] = labels
    write_shards(tmp_path / "shards", {"train": [4], "valid": [2]}, special)
    code, out = cli(capsys, "inspect", str(tmp_path / "shards"), "--verify")
    float32 = "is not a finite float32 number (labels are at most 3.4e38)"
    assert code == 1 and "3 PROBLEM(S)" in out
    assert f"train-000000.tar: sample train0__c0: label 'label' = an integer of 401 digits {float32}" in out
    assert "sample train0__c2: meta.json 'labels' must be an object (label name -> value), got a list" in out
    assert f"valid-000000.tar: sample valid0__c0: label 'label' = 3.5e+38 {float32}" in out
    args = ["train", "--shards", str(tmp_path / "shards"), "--model", "late", *FAST, "epochs=1", "selection=last"]
    code, out = cli(capsys, *args, "--run-dir", str(tmp_path / "strict"))
    assert code == 1 and "Traceback" not in out
    assert "shard train-000000.tar: sample train0__c" in out and "label" in out
    code, out = cli(capsys, *args, "--run-dir", str(tmp_path / "lenient"), "--skip-bad-samples")
    assert code == 0, out
    records = [json.loads(line) for line in (tmp_path / "lenient" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["count"] for r in records if r["kind"] == "skipped") == 2  # both bad train samples
