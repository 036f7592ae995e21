"""Two ranks on two nodes whose run directories are node-local: only rank 0's holds the checkpoints. A resume and
the final evaluation's selected checkpoint are read by rank 0 alone and broadcast to the other rank."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from test_ddp_steps import launch_two_ranks
from test_trainer import losses

from train.config import make_train_config
from train.trainer import fit

SETTINGS = ["batch_size=1", "num_workers=0", "log_every=1", "model.hidden=12", "model.num_heads=3", "device=cpu"]


def _rank(rank: int, tmp: str, shards: str, run_dir: str) -> None:
    """Resume the run in ``run_dir`` (this node's copy) as one of 2 ranks; record what this rank read from disk,
    its step and its network after the final evaluation loaded the selected checkpoint."""
    import os

    import torch
    import torch.distributed as dist

    import train.trainer

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")  # a node each
    # joined here with a short timeout, so a rank left waiting fails in seconds (fit keeps this group)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))  # fmt: skip
    reads, record = [], {"rank": rank}
    load = torch.load

    def counted(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):  # not the tensors a broadcast unpickles from bytes
            reads.append(Path(f).name)
        return load(f, *args, **kwargs)

    torch.load = counted
    finish = train.trainer.finish

    def finish_recorded(job, run, parts):
        final = finish(job, run, parts)
        params = [p.detach().double() for p in parts.net.parameters()]
        record.update(step=run.step, checksum=float(sum((p * (i + 1)).sum() for i, p in enumerate(params))))
        return final

    train.trainer.finish = finish_recorded
    config = make_train_config("late", overrides=[*SETTINGS, "epochs=3"])
    try:
        fit(config, Path(shards), Path(run_dir), resume=True)
    except Exception as exc:  # noqa: BLE001 - recorded for the test to show
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["reads"] = reads
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.integration
def test_only_rank_0_reads_checkpoints_from_its_node_local_run_dir(bundled_dataset: Path, tmp_path: Path) -> None:
    node0, node1 = tmp_path / "node0" / "run", tmp_path / "node1" / "run"
    config = make_train_config("late", overrides=[*SETTINGS, "epochs=1", "checkpoint_every=1"])
    fit(config, bundled_dataset, node0)  # 2 steps on one process; node 1's disk has no run directory at all
    args = [(r, str(tmp_path), str(bundled_dataset), str(run_dir)) for r, run_dir in enumerate([node0, node1])]
    launch_two_ranks(_rank, args, timeout=180)  # a rank's error is in its record, shown below
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r.get("error") for r in ranks] == [None, None], ranks
    assert ranks[0]["reads"] == ["last.pt", "best.pt"] and ranks[1]["reads"] == []  # resume, then the selected one
    assert [r["step"] for r in ranks] == [3, 3]  # one more step: 2 clips over 2 ranks, one batch each
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # rank 1 evaluated rank 0's selected checkpoint
    assert sorted(losses(node0)) == [1, 2, 3] and not node1.exists()
