"""``mmfuse`` under torchrun, with a record of what each rank did: ``python rank_probe.py OUT mmfuse-args...``
(``torchrun`` below starts it so).

Writes ``OUT/rank<RANK>.json`` when the command returns. Training: the step reached, the device, a checksum of
the network's parameters as training left them (before the final evaluation loads the selected checkpoint), and
how many micro-batches this rank ran with zero weight because only another rank had labels. Extraction: the
device the rank extracted on and the CUDA memory it peaked at there (0 on the CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import extract.pipeline
import train.step
import train.trainer
from mmfuse.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECORD: dict = {"rank": int(os.environ.get("RANK", "0")), "zero_weight_batches": 0}


def probe_training() -> None:
    finish, labelled_anywhere = train.trainer.finish, train.step.labelled_anywhere

    def finish_recorded(job, run, parts):
        params = [p.detach().double().cpu() for p in parts.net.parameters()]
        RECORD.update(
            step=run.step,
            device=str(job.d.device),
            checksum=float(sum((p * (i + 1)).sum() for i, p in enumerate(params))),
            abs_sum=float(sum(p.abs().sum() for p in params)),
        )
        return finish(job, run, parts)

    def anywhere_recorded(d, grad_accum, counts):
        flags = labelled_anywhere(d, grad_accum, counts)
        RECORD["zero_weight_batches"] += sum(1 for n, f in zip(counts, flags, strict=True) if f and n == 0)
        return flags

    train.trainer.finish, train.step.labelled_anywhere = finish_recorded, anywhere_recorded


def probe_extraction() -> None:
    run_extract = extract.pipeline.run_extract

    def run_recorded(manifest, media_root, out, cfg, progress=None):
        summary = run_extract(manifest, media_root, out, cfg, progress=progress)
        cuda = cfg.device.startswith("cuda")
        RECORD.update(device=cfg.device, cuda_peak_bytes=torch.cuda.max_memory_allocated(cfg.device) if cuda else 0)
        return summary

    extract.pipeline.run_extract = run_recorded


def torchrun(procs: int, out: Path, args: list[str], env: dict[str, str], timeout: int) -> list[dict]:
    """``mmfuse ARGS`` on ``procs`` ranks under torchrun through this script; each rank's record. A run that does
    not finish within ``timeout`` seconds (a hang) fails."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), __file__]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # the carried wheels too
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **env}
    try:
        done = subprocess.run(
            [*cmd, str(out), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{procs} rank(s) did not finish within {timeout} s: hung") from None
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    probe_training()
    probe_extraction()
    code = main(sys.argv[2:])
    (out / f"rank{RECORD['rank']}.json").write_text(json.dumps(RECORD))
    sys.exit(code)
