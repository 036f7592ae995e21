"""``mmfuse bench extract --precisions`` and ``--modalities text``: the precision table and the text-only
comparison's inputs and report."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from bench.extract import precision_list
from bench.extract_precision import deviation
from bench.extract_text import format_table, transcripts
from extract.extractors.base import ExtractionError
from mmfuse.cli import main


def test_precision_flag_and_deviation():
    assert precision_list("fp32, bf16,fp16") == ["fp32", "bf16", "fp16"]
    with pytest.raises(argparse.ArgumentTypeError, match="among fp32, bf16, fp16"):
        precision_list("fp32,fp8")
    a = [np.array([[1.0, 0.0], [0.0, 2.0]]), None]
    b = [np.array([[1.0, 0.5], [0.0, 2.0]]), None]
    max_abs, cosine = deviation(a, b)
    assert max_abs == 0.5 and cosine == pytest.approx((1 / np.sqrt(1.25) + 1.0) / 2)
    with pytest.raises(ExtractionError, match="one precision and none at the other"):
        deviation(a, [b[0], np.zeros((1, 2))])


def test_quick_precision_table(tmp_path, tiny_text_model, tiny_audio_model, capsys):
    out = tmp_path / "BENCHMARKS.md"
    argv = ["bench", "extract", "--quick", "--clips", "4", "--precisions", "fp32,bf16", "--json", "--no-progress"]
    argv += ["--text-model", str(tiny_text_model), "--audio-model", str(tiny_audio_model), "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    fp32, bf16 = report["rows"]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    for modality in ("text", "audio"):
        assert fp32[modality]["max_abs"] == 0 and fp32[modality]["speed_vs_fp32"] == 1
        assert 0 < bf16[modality]["max_abs"] < 0.2 and 0.999 < bf16[modality]["mean_cosine"] < 1
        assert bf16[modality]["seconds"] > 0
    assert report["command"].endswith("--precisions fp32,bf16")
    text = out.read_text()
    assert "## Encoder precision" in text and "| bf16 |" in text


def test_text_only_transcripts_and_report():
    texts = transcripts(50)
    assert texts == transcripts(50) and len(set(texts)) == 50
    assert min(len(t.split()) for t in texts) >= 4 and max(len(t.split()) for t in texts) <= 40
    report = {
        "runs": {"mmfuse": {"wall_s": 30.0, "cpu_s": 40.0}, "plain": {"wall_s": 24.0, "cpu_s": 32.0}},
        "wall_ratio": 1.25,
        "cpu_ratio": 1.25,
    }
    table = format_table(report)
    assert "| ratio mmfuse / plain | **1.25×** | 1.25× |" in table and "| 30.00 | 40.00 |" in table
