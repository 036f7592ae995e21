"""What a run writes as it goes: metrics.jsonl, TensorBoard events and a PNG of the learning curves.

Only rank 0 writes (``enabled``); other ranks get a ``RunLog`` that does nothing.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from train.runtime import append_jsonl

log = logging.getLogger(__name__)


def _scalar(value: Any) -> float | None:
    try:
        if hasattr(value, "dim") and value.dim() != 0:
            return None
        return float(value)
    except (TypeError, ValueError):
        return None


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "events"))

    def _write(self, record: dict[str, Any]) -> None:
        append_jsonl(self.run_dir / "metrics.jsonl", record)
        if self.writer is not None:
            prefix = record["kind"] if record["kind"] == "train" else record["split"].split(" ")[0]
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def train(self, step, epoch, loss, losses, diagnostics, grad_norm, lrs, seconds) -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"kind": "train", "step": step, "epoch": epoch, "loss": loss, "grad_norm": grad_norm}
        record.update({f"loss/{k}": float(v.detach()) for k, v in losses.items()})
        record.update({f"diag/{k}": s for k, v in diagnostics.items() if (s := _scalar(v)) is not None})
        record.update({f"lr/{i}": lr for i, lr in enumerate(lrs)})
        record["seconds"] = seconds
        self._write(record)
        log.info("step %d epoch %d loss %.4f grad-norm %.3f", step, epoch, loss, grad_norm)

    def eval(self, step, epoch, split: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write({"kind": "eval", "split": split, "step": step, "epoch": epoch, **metrics})
        # the model's diagnostics (diag/...) go to metrics.jsonl only; the gradient shares are shown
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "diag/" not in k)
        log.info("%s at step %d: %s", split, step, shown)

    def note(self, step, what: str, values: dict[str, Any]) -> None:
        if self.enabled:
            self._write({"kind": what, "split": what, "step": step, **values})

    def curves(self, metric: str) -> Path | None:
        """curves.png: training loss and the validation selection metric against the step."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines() if line]
        train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
        valid = [
            (r["step"], r[metric])
            for r in records
            if r["kind"] == "eval"
            and r["split"] == "valid"
            and isinstance(r.get(metric), float)
            and not math.isnan(r[metric])
        ]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        if train:
            axes[0].plot(*zip(*train, strict=True), marker=".")
        axes[0].set(title="training loss", xlabel="step")
        if valid:
            axes[1].plot(*zip(*valid, strict=True), marker="o", color="C1")
        axes[1].set(title=f"validation {metric}", xlabel="step")
        fig.tight_layout()
        out = self.run_dir / "curves.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
