"""Throughput sweeps of ``mmfuse bench extract|train --sweep``: the points, their table and their plot.

A sweep varies one setting at a time around the command's own: the worker counts of ``--sweep-workers`` at
``--batch-size``, then the batch sizes of ``--sweep-batch-sizes`` at ``--workers``. A setting that lies on both
lines (``--workers`` with ``--batch-size``) is measured once and shown in both. A sweep report is a dict with

- ``title``: the figure's title;
- ``metric``: the key of the throughput in every point (``clips_per_s``), ``unit`` its axis label (``clips/s``);
- ``label`` (optional): the legend of the metric's line when there is a reference (default: ``unit``);
- ``reference`` (optional): ``{"metric": key, "label": legend}`` of a second line drawn in both panels;
- ``points``: ``[{"sweep": "workers" | "batch_size", "workers": K, "batch_size": B, <metric>: rate, ...}]``;

plus whatever its benchmark adds (command, machine, settings). :func:`plot_sweep` turns one into a PNG.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable, Sequence
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command line imports this module at start-up: no shards (numpy) here
    from shards import Progress

SWEEPS = ("workers", "batch_size")
LABELS = {"workers": "workers", "batch_size": "batch size"}
FIGSIZE, DPI = (8.0, 3.0), 100  # inches; the PNG is 800 x 300 pixels


def _counts(text: str, minimum: int, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected integers separated by commas, got {text!r}") from None
    if min(values) < minimum or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{what}: expected distinct integers >= {minimum}, got {text!r}")
    return values


def worker_counts(text: str) -> tuple[int, ...]:
    """``--sweep-workers``: distinct counts >= 0 (0: everything in the main process)."""
    return _counts(text, 0, "worker counts")


def batch_sizes(text: str) -> tuple[int, ...]:
    """``--sweep-batch-sizes``: distinct sizes >= 1."""
    return _counts(text, 1, "batch sizes")


def add_sweep_arguments(
    p: argparse.ArgumentParser, what: str, defaults: Sequence[Sequence[int]], quick: Sequence[Sequence[int]], png: str
) -> None:
    """The ``--sweep`` flags of one benchmark: ``defaults`` and ``quick`` are (worker counts, batch sizes) without
    and with ``--quick``, ``png`` the plot's default file name."""
    p.add_argument(
        "--sweep",
        action="store_true",
        help=f"instead of the comparison: {what} vs workers and vs batch size: a table, a PNG plot, its own --out "
        "section",
    )
    p.add_argument(
        "--sweep-workers",
        type=worker_counts,
        metavar="K,K,...",
        help=f"worker counts of --sweep (default {spell(defaults[0])}; --quick: {spell(quick[0])})",
    )
    p.add_argument(
        "--sweep-batch-sizes",
        type=batch_sizes,
        metavar="B,B,...",
        help=f"batch sizes of --sweep (default {spell(defaults[1])}; --quick: {spell(quick[1])})",
    )
    p.add_argument(
        "--plot", type=Path, metavar="PNG", help=f"PNG of --sweep (default with --out: docs/bench/{png} beside it)"
    )


def stray_sweep_flags(args: argparse.Namespace) -> list[str]:
    """The sweep flags given without ``--sweep`` (they would be ignored)."""
    if args.sweep:
        return []
    given = {"--sweep-workers": args.sweep_workers, "--sweep-batch-sizes": args.sweep_batch_sizes, "--plot": args.plot}
    return [flag for flag, value in given.items() if value is not None]


def spell(values: Sequence[int]) -> str:
    """``(0, 1, 2)`` as the command line spells it: ``0,1,2``."""
    return ",".join(str(v) for v in values)


def measure_points(
    workers: Sequence[int],
    sizes: Sequence[int],
    at_workers: int,
    at_batch: int,
    run: Callable[[int, int], dict],
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """``run(workers, batch_size)`` once per distinct setting: worker counts at ``at_batch``, then batch sizes at
    ``at_workers``. Returns one point per (sweep, value), in that order, each with ``run``'s measurements.
    ``progress(settings measured, distinct settings)`` follows the runs."""
    plan = [("workers", w, at_batch) for w in workers] + [("batch_size", at_workers, b) for b in sizes]
    tick = ticker(progress, len({(w, b) for _, w, b in plan}))
    done: dict[tuple[int, int], dict[str, Any]] = {}
    points = []
    for sweep, w, b in plan:
        if (w, b) not in done:
            done[w, b] = run(w, b)
            tick()
        points.append({"sweep": sweep, "workers": w, "batch_size": b, **done[w, b]})
    return points


def ticker(progress: Progress | None, total: int) -> Callable[[], None]:
    """A callable that reports one more of ``total`` steps done to ``progress`` (if any) each time it is called;
    reports 0 done at once."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    return tick


def plot_path(out: Path | None, plot: Path | None, name: str) -> Path | None:
    """Where the PNG goes: ``--plot``, else ``docs/bench/<name>`` beside ``--out``, else nowhere."""
    if plot is not None:
        return plot
    return out.parent / "docs" / "bench" / name if out is not None else None


def image_link(markdown: Path, png: Path, alt: str) -> str:
    """A Markdown image of ``png`` relative to the directory of ``markdown`` (as GitHub resolves it)."""
    rel = Path(os.path.relpath(png.resolve(), markdown.resolve().parent)).as_posix()
    return f"![{alt}]({rel})"


def points_table(points: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> list[str]:
    """A Markdown table, one row per point: sweep, workers, batch, then ``(header, key, format)`` columns."""
    head = ["sweep", "workers", "batch", *(h for h, _, _ in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        cells = [LABELS[p["sweep"]], str(p["workers"]), str(p["batch_size"])]
        cells += ["" if p.get(key) is None else format(p[key], fmt) for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def shared_note(points: list[dict[str, Any]]) -> str:
    """A sentence naming the settings measured once and shown in both sweeps (empty when none)."""
    settings = {sweep: [(p["workers"], p["batch_size"]) for p in points if p["sweep"] == sweep] for sweep in SWEEPS}
    both = [s for s in settings["batch_size"] if s in settings["workers"]]
    return " ".join(f"Workers {w} with batch {b} is one run, shown in both sweeps." for w, b in both)


def plot_sweep(report: dict[str, Any], path: Path) -> Path:
    """Draw ``report`` (see the module docstring) as two panels side by side: ``metric`` against the worker
    count and against the batch size, every point marked with its value, the ``reference`` line dashed.
    Writes an 800 x 300 pixel PNG at ``path`` (parents created) and returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, sweep in zip(fig.subplots(1, 2), SWEEPS, strict=True):
        _panel(ax, report, sweep)
    fig.suptitle(report["title"], fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # glyphs missing from the default font in user-given model names
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(path, dpi=DPI)
    return path


def _panel(ax: Any, report: dict[str, Any], sweep: str) -> None:
    """One sweep's line(s) on ``ax``; the x axis is base-2 logarithmic for batch sizes spanning 4x or more."""
    points = sorted((p for p in report["points"] if p["sweep"] == sweep), key=itemgetter(sweep))
    fixed = SWEEPS[1 - SWEEPS.index(sweep)]
    ax.set_ylabel(report["unit"], fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if not points:
        ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(LABELS[sweep], fontsize=8)
        return
    xs = [p[sweep] for p in points]
    reference = report.get("reference")
    # values above each point; below the measured line when a reference (usually the faster) is drawn above it
    lines = [(report["metric"], report.get("label", report["unit"]), "o", "-", -11 if reference else 5)]
    if reference:
        lines.append((reference["metric"], reference["label"], "s", "--", 5))
    top = 0.0
    for key, label, marker, style, dy in lines:
        ys = [p[key] for p in points]
        ax.plot(xs, ys, marker=marker, linestyle=style, markersize=4, label=label)
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, dy), ha="center", fontsize=7)
        top = max(top, *ys)
    if sweep == "batch_size" and max(xs) >= 4 * min(xs):
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    ax.set_xticks(xs, [str(x) for x in xs])
    if len(xs) == 1:
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
    ax.set_ylim(0, 1.25 * top if top > 0 else 1)
    ax.set_xlabel(f"{LABELS[sweep]} (at {LABELS[fixed]} {points[0][fixed]})", fontsize=8)
    if len(lines) > 1:
        ax.legend(fontsize=7, loc="best")
