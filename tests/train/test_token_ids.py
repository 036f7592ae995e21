"""Token ids outside the text encoder's vocabulary never reach the encoder in end-to-end training: refused where
samples are validated (and, for batches made elsewhere, before the encoder), naming the sample, the id and the
vocabulary size."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfuse.cli import main
from train.inputs import DataError

FAST = ["batch_size=1", "num_workers=0", "log_every=1", "model.hidden=12", "model.num_heads=3", "device=cpu"]
VOCAB = 30522  # the tiny BERT's, from the bundled MiniLM tokenizer


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def replace_member(shard: Path, member: str, data: bytes) -> None:
    with tarfile.open(shard) as tin:
        members = [(info, tin.extractfile(info).read()) for info in tin]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tout:
        for info, old in members:
            new = data if info.name == member else old
            info.size = len(new)
            tout.addfile(info, io.BytesIO(new))


def test_out_of_vocabulary_text_ids_stop_end_to_end_training(bundled_dataset: Path, tmp_path: Path, capsys) -> None:
    """A token id past the text encoder's embedding (an IndexError on a CPU, a device-side assert on CUDA) is
    refused where samples are validated, before the batch reaches the encoder: the sample, the id and the
    vocabulary size are named; ``--skip-bad-samples`` counts it instead. Frozen training does not read the ids."""
    shards = Path(shutil.copytree(bundled_dataset, tmp_path / "shards"))
    with tarfile.open(shards / "train-000000.tar") as tar:
        ids = np.load(io.BytesIO(tar.extractfile("grid__pwij3p.text_ids.npy").read()))
    ids[2] = 40000
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    replace_member(shards / "train-000000.tar", "grid__pwij3p.text_ids.npy", buf.getvalue())
    args = ["train", "--shards", str(shards), "--model", "late", *FAST, "epochs=1", "mode=end_to_end"]
    code, out = cli(capsys, *args, "--run-dir", str(tmp_path / "strict"))
    assert code == 1 and "Traceback" not in out
    assert (
        f"shard train-000000.tar: sample grid__pwij3p: text_ids holds token id 40000, outside the text encoder's "
        f"vocabulary of {VOCAB} ids (0 to {VOCAB - 1})"
    ) in out
    code, out = cli(capsys, *args, "--run-dir", str(tmp_path / "lenient"), "--skip-bad-samples")
    assert code == 0, out
    records = [json.loads(line) for line in (tmp_path / "lenient" / "metrics.jsonl").read_text().splitlines()]
    assert [r["count"] for r in records if r["kind"] == "skipped"] == [1]
    assert cli(capsys, *args[:-1], "--run-dir", str(tmp_path / "frozen"))[0] == 0


def test_a_batch_with_an_id_past_the_vocabulary_never_reaches_the_encoder() -> None:
    from train.pipeline import check_token_ids

    batch = {"key": ["a", "b"], "text_ids": torch.tensor([[101, 7, 102], [101, VOCAB, 102]])}
    with pytest.raises(DataError, match=rf"^sample b: text_ids holds token id {VOCAB}, outside the text encoder's "):
        check_token_ids(batch, VOCAB)
    batch["text_ids"][1, 1] = -1
    with pytest.raises(DataError, match="^sample b: text_ids holds token id -1"):
        check_token_ids(batch, VOCAB)
    batch["text_ids"][1, 1] = VOCAB - 1
    check_token_ids(batch, VOCAB)
