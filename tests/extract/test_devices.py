"""One device resolver for every command: a device this machine lacks is one line and exit 1, before anything is
loaded or written, the same error type for extract, train, eval and predict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from extract.devices import DeviceError, resolve_device
from mmfuse.cli import main
from mmfuse.errors import MmfuseError

NO_CUDA = "was asked for but CUDA is not available; use"


def test_the_resolver_names_the_value_as_it_was_given(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(
        DeviceError, match=r"^device=cuda was asked for but CUDA is not available; use device=cpu or auto$"
    ):
        resolve_device("cuda", 1, option="device")
    with pytest.raises(DeviceError, match=r"^--device 'gpu' is not a device: use auto, cpu, cuda or cuda:N$"):
        resolve_device("gpu")
    with pytest.raises(DeviceError, match=r"^device='cudax' is not a device"):
        resolve_device("cudax", option="device")
    with pytest.raises(DeviceError, match=r"^--device 'auto' is not a device: use cpu, cuda or cuda:N$"):
        resolve_device("auto", auto=False)
    with pytest.raises(
        DeviceError, match=r"^--device cuda:0 was asked for but CUDA is not available; use --device cpu$"
    ):
        resolve_device("cuda:0", auto=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert (
        resolve_device("auto") == "cuda"
        and resolve_device("cuda", 3) == "cuda:1"
        and resolve_device("auto", 2) == "cuda:0"
    )
    with pytest.raises(DeviceError, match=r"^--device cuda:2: this machine has 2 GPU\(s\), cuda:0 to cuda:1$"):
        resolve_device("cuda:2")
    assert issubclass(DeviceError, MmfuseError)


def command_line(command: str, tmp: Path) -> tuple[list[str], str, Path]:
    """The arguments of ``command`` asking for CUDA, the line it must print, and a path it must not create."""
    spec = {
        "train": (["train", "--shards", str(tmp / "shards"), "--model", "late", "--run-dir", str(tmp / "out"),
                   "epochs=1", "device=cuda"], "device=cuda", "device=cpu"),
        "eval": (["eval", "--checkpoint", str(tmp / "best.pt"), "--shards", str(tmp / "shards"), "--predictions",
                  str(tmp / "out"), "--device", "cuda"], "--device cuda", "--device cpu"),
        "predict": (["predict", "--checkpoint", str(tmp / "best.pt"), str(tmp / "clip.mp4"), "--device", "cuda"],
                    "--device cuda", "--device cpu"),
        "extract": (["extract", str(tmp / "label.csv"), "--media-root", str(tmp), "--out", str(tmp / "out"),
                     "--device", "cuda"], "--device cuda", "--device cpu"),  # extraction takes no auto
    }[command]  # fmt: skip
    argv, asked, instead = spec
    instead += "" if command == "extract" else " or auto"
    return argv, f"mmfuse {command}: error: {asked} {NO_CUDA} {instead}", tmp / "out"


@pytest.mark.parametrize("command", ["train", "eval", "predict", "extract"])
def test_every_command_refuses_a_missing_gpu_in_one_line(command: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "label.csv").write_text("video_id,clip_id,text,label\nv,c,hello,1\n")
    argv, line, out = command_line(command, tmp_path)
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [line] and captured.out == ""
    assert not out.exists()  # refused before anything was written
