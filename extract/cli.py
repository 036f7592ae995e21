"""``mmfuse extract``, ``mmfuse inspect`` and ``mmfuse report``: argument parsing and the run functions."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from mmfuse.commands import Commands

EXTRACT_EXAMPLES = """examples:
  # MMSA layout: label.csv beside Raw/<video_id>/<clip_id>.mp4
  mmfuse extract MOSI/label.csv --media-root MOSI/Raw --out shards/mosi \\
      --text-model bert-base-uncased --audio-model facebook/wav2vec2-base --fps 25 --workers 4
  # no transcripts in the manifest: transcribe the audio with a local Whisper checkpoint
  mmfuse extract videos.csv --media-root videos --out shards/asr --asr ~/models/whisper-small --asr-language en
  # any setting as KEY=VALUE (general ones, or an extractor's section by its registry name), after the manifest
  mmfuse extract label.csv facemesh.max_faces=2 audio.chunk_s=20 --media-root Raw --out shards/y
  # another registered extractor for a modality
  mmfuse extract label.csv extractors.video=NAME --media-root Raw --out shards/z
  # transcript-only corpus: no media needed
  mmfuse extract transcripts.jsonl --out shards/text --modalities text
  # two machines (or `torchrun --nproc-per-node 2 -m mmfuse extract ...`): disjoint shards, one dataset
  mmfuse extract label.csv --media-root Raw --out shards/x --rank 0 --world-size 2
  mmfuse extract label.csv --media-root Raw --out shards/x --rank 1 --world-size 2
  # a Ray cluster (pip install 'mmfuse[ray]'; --out on a file system every node sees)
  mmfuse extract label.csv --media-root Raw --out /shared/x --engine ray --ray-address head:6379 --device cuda

Rerunning the same command resumes: complete shards are skipped, incomplete ones redone.
"""


def add_extract(commands: Commands) -> None:
    p = commands.add(
        "extract",
        help="raw videos + manifest -> WebDataset shards",
        description="Extract BERT text, wav2vec 2.0 audio and MediaPipe face-landmark features into shards. Every "
        "setting, its default and meaning: docs/settings.md.",
        epilog=EXTRACT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("manifest", type=Path, help="CSV (MMSA label.csv or superset) or JSONL, one row per clip")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="any extraction setting: a general one (workers=2) or one of an extractor's section, named by its "
        "registry name (facemesh.max_faces=2 audio.chunk_s=20 text.layer=-2; older flat names such as max_faces "
        "too), or extractors.MODALITY=NAME; a setting given by a flag and a KEY=VALUE too is an error",
    )  # fmt: skip
    p.add_argument("--media-root", type=Path, help="directory the media paths are relative to")
    p.add_argument("--out", type=Path, required=True, help="output directory for shards")
    p.add_argument("--config", type=Path, help="YAML file of extraction settings (overridden by flags)")
    p.add_argument("--text-model", help="BERT-family id or local path (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--audio-model", help="wav2vec2/HuBERT/WavLM id or local path (default: random:wav2vec2-small)")
    p.add_argument("--fps", type=float, help="video frame rate (default: native, capped at 30)")
    p.add_argument("--shard-size", type=int, help="clips per shard (default 256)")
    p.add_argument(
        "--workers",
        type=count_or_auto,
        metavar="N|auto",
        help="decode + FaceMesh processes (0 = inline; default auto: cores - 1, none for text only)",
    )
    p.add_argument(
        "--batch-size",
        type=count_or_auto,
        metavar="N|auto",
        help="clips per encoder batch (default auto: 2 on CPU, 16 for text only on CPU, 32 on CUDA)",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu); cuda under torchrun: cuda:LOCAL_RANK")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16", "auto"],
        help="text and audio encoder precision (default auto: fp32 on CPU; on CUDA bf16 where supported, else fp16)",
    )
    p.add_argument("--rank", type=int, help="this process's rank (default: RANK / SLURM env, else 0)")
    p.add_argument("--world-size", type=int, help="number of ranks (default: WORLD_SIZE / SLURM env, else 1)")
    p.add_argument(
        "--engine", choices=("local", "ray"), default="local",
        help="local: this machine's processes (default); ray: Ray actors, on a cluster with --ray-address",
    )  # fmt: skip
    p.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default RAY_ADDRESS, else a local Ray)")
    p.add_argument("--modalities", help="comma-separated subset of text,audio,video (default all)")
    p.add_argument(
        "--asr",
        metavar="PATH",
        help="local Whisper checkpoint (saved with save_pretrained; never downloaded): transcribe clips whose "
        "manifest text is empty or missing; needs the text and audio modalities",
    )
    p.add_argument("--asr-language", metavar="CODE", help="language for --asr, e.g. en (default: detected per window)")
    p.add_argument("--no-raw", action="store_true", help="omit audio_wave.npy (no end-to-end audio fine-tuning)")
    p.add_argument("--overwrite", action="store_true", help="replace shards of another feature set in --out")
    p.set_defaults(run=run_extract_cmd)


def run_extract_cmd(args: argparse.Namespace) -> int:
    from extract.config import ConfigError, local_device, make_config, rank_from_env
    from extract.pipeline import run_extract

    rank, world = rank_from_env()
    given = {token.split("=", 1)[0].strip() for token in args.overrides}
    cfg = make_config(
        args.config,
        args.overrides,
        text_model=args.text_model,
        audio_model=args.audio_model,
        fps=args.fps,
        shard_size=args.shard_size,
        workers=args.workers,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        modalities=args.modalities,
        asr=args.asr,
        asr_language=args.asr_language,
        raw=False if args.no_raw else None,
        overwrite=True if args.overwrite else None,
        rank=args.rank if args.rank is not None or "rank" in given else rank,  # the environment's, unless given
        world_size=args.world_size if args.world_size is not None or "world_size" in given else world,
    )
    cfg = dataclasses.replace(cfg, device=local_device(cfg.device))  # torchrun: one GPU per local rank
    if args.ray_address and args.engine != "ray":
        raise ConfigError("--ray-address is for --engine ray: add --engine ray")
    with args.progress("extract", "clip") as bar:
        if args.engine == "ray":
            from extract.ray_engine import run_extract_ray

            summary = run_extract_ray(args.manifest, args.media_root, args.out, cfg, bar, args.ray_address)
        else:
            summary = run_extract(args.manifest, args.media_root, args.out, cfg, progress=bar)
    if not args.quiet:
        print(summary_line(summary))
    return 0


def summary_line(summary: dict) -> str:
    """What ``mmfuse extract`` prints when it is done: what it wrote, what was complete before, and the shards it
    left to another extraction that holds them (that run writes them and completes ``dataset.json``)."""
    held = summary.get("shards_held_elsewhere") or []
    before = summary["shards_this_rank"] - summary["shards_written"] - len(held)
    counts = "; ".join(f"{s}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for s, c in summary["counts"].items())
    line = (
        f"wrote {summary['samples_written']} samples in {summary['shards_written']} shards ({before} already "
        f"complete) to {summary['out']} in {summary['wall_s']:.1f} s" + (f"; {counts}" if counts else "")
    )
    if summary.get("clips_unlabelled"):
        line += f"; {summary['clips_unlabelled']} clips without a label"
    if held:
        names = ", ".join(held[:3]) + (" ..." if len(held) > 3 else "")
        return line + (
            f"; {len(held)} of this run's {summary['shards_this_rank']} shards were left to another extraction "
            f"that is writing them ({names}): dataset.json is complete once it finishes"
        )
    return line + ("" if summary["complete"] else " (other ranks still have shards to write)")


def count_or_auto(text: str) -> int | str:
    """An argparse type: a whole number >= 0, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number nor auto") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; give a whole number >= 0 or auto")
    return value


def add_inspect(commands: Commands) -> None:
    p = commands.add(
        "inspect",
        help="counts by split/status, coverage, dims, provenance of a shard directory",
        description="Summarise a shard directory; --verify reads back and validates every sample.",
        epilog="examples:\n  mmfuse inspect shards/mosi\n  mmfuse inspect shards/mosi --verify --json > check.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shards", type=Path, help="directory written by `mmfuse extract`")
    p.add_argument("--verify", action="store_true", help="read and validate every sample (exit 1 on problems)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_inspect_cmd)


def run_inspect_cmd(args: argparse.Namespace) -> int:
    from shards.inspect import format_summary, inspect_dataset

    with args.progress("verify", "sample") as bar:
        summary = inspect_dataset(args.shards, verify=args.verify, progress=bar)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0 if summary.get("verify", {}).get("ok", True) else 1


def add_report(commands: Commands) -> None:
    p = commands.add(
        "report",
        help="HTML quality report with plots and landmark overlays",
        description="Write a self-contained HTML report (PNG plots, landmark overlays) about extraction quality.",
        epilog="examples:\n  mmfuse report shards/mosi --out reports/mosi && open reports/mosi/index.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shards", type=Path, help="directory written by `mmfuse extract`")
    p.add_argument("--out", type=Path, required=True, help="directory for index.html and the PNG files")
    p.add_argument("--media-root", type=Path, help="where the media are now (default: as recorded at extraction)")
    p.add_argument("--overlays", type=int, default=4, help="clips to draw landmark overlays for (default 4)")
    p.set_defaults(run=run_report_cmd)


def run_report_cmd(args: argparse.Namespace) -> int:
    from extract.report import write_report

    with args.progress("report", "sample") as bar:
        index = write_report(args.shards, args.out, media_root=args.media_root, overlays=args.overlays, progress=bar)
    if not args.quiet:
        print(f"report written to {index}")
    return 0


def add_import_mmsa(commands: Commands) -> None:
    p = commands.add(
        "import-mmsa",
        help="convert MMSA / MMSA-FET / MulT feature pickles into shards",
        description="Convert a published feature pickle (MMSA aligned/unaligned, MMSA-FET, MulT) into shards with "
        "masks, so the fusion models train on the standard features. Pickles can run code when loaded: "
        "--trust-pickle is required.",
        epilog="examples:\n  mmfuse import-mmsa MOSI/Processed/unaligned_50.pkl --out shards/mosi-mmsa --trust-pickle\n"
        "  mmfuse import-mmsa mosei_senti_data_noalign.pkl --out shards/mosei-mult --trust-pickle",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("features", type=Path, help="the feature pickle")
    p.add_argument("--out", required=True, type=Path, help="new shard directory")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading the pickle (it can run code)")
    p.add_argument("--shard-size", type=int, default=256)
    p.set_defaults(run=run_import_mmsa)


def run_import_mmsa(args: argparse.Namespace) -> int:
    from extract.import_mmsa import import_mmsa

    with args.progress("import", "sample") as bar:
        dataset = import_mmsa(
            args.features, args.out, trust_pickle=args.trust_pickle, shard_size=args.shard_size, progress=bar
        )
    counts = ", ".join(f"{split}: {sum(c.values())}" for split, c in dataset["counts"].items())
    print(f"imported {dataset['samples']} samples ({counts}) from {args.features} into {args.out}")
    print(
        f"format {dataset['feature_set']['imported']['format']}, dims {dataset['dims']}; check with "
        f"`mmfuse inspect {args.out} --verify`"
    )
    return 0
