"""The two actors of ``--engine ray`` (:mod:`extract.ray_engine`): plain classes here, made Ray actors there.

:class:`Decoder` (one CPU each) decodes a clip and runs the worker extractors on it (FaceMesh: one graph per
actor, built once by :func:`extract.worker.init_worker` and kept across clips). It returns the
:class:`~extract.extractors.base.DecodedClip` with its frames dropped: the int16 waveform, the landmarks and
the statuses cross processes, decoded frames never do.

:class:`Encoder` (one GPU each with ``--device cuda``, else one CPU) builds the encoder extractors once and
writes whole shards: it takes a shard's plan and the references of its clips' decoding, resolves them in plan
order, encodes them in groups of ``batch_size`` and commits the shard exactly as the local engine does
(:class:`~extract.writer.ShardBuilder`: temporary tar, rename, sidecar last). A shard redone after a lost
actor is written from the start under a new temporary name, so a clip ends up in its shard exactly once.

``MMFUSE_RAY_FAULT`` injects faults for the tests, comma-separated: ``kill:<clip key or shard name>:<marker
file>`` makes the actor that reaches that clip (decoding) or shard (encoding) kill itself with SIGKILL, once
(the marker file records that it happened); ``stall:<clip key>`` makes the decoder of that clip hang.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from extract.config import ExtractConfig
from extract.extractors.base import DecodedClip, ExtractionError
from extract.manifest import Clip
from extract.worker import DecodeSettings, cap_malloc_arenas, decode_clip, init_worker

FAULT_ENV = "MMFUSE_RAY_FAULT"
CRASHED = "the decoder process crashed on this file"  # the local engine's status for the same case


def inject_fault(name: str) -> None:
    """The fault ``MMFUSE_RAY_FAULT`` asks for at ``name`` (a clip key or a shard name), if any."""
    for spec in os.environ.get(FAULT_ENV, "").split(","):
        kind, _, rest = spec.partition(":")
        target, _, marker = rest.partition(":")
        if target != name:
            continue
        if kind == "stall":
            time.sleep(3600)
        elif kind == "kill" and marker:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue  # it happened already: this is the retry
            os.kill(os.getpid(), signal.SIGKILL)


class Decoder:
    """Decode + worker extractors, one clip per call; the worker extractors are built once per actor."""

    def __init__(self, settings: DecodeSettings) -> None:
        os.environ.setdefault("GLOG_minloglevel", "2")
        cap_malloc_arenas()  # a process that only decodes (see there)
        self.settings = settings
        init_worker(settings)

    def decode(self, clip: Clip) -> DecodedClip:
        inject_fault(clip.key)
        return decode_clip(clip, self.settings)  # its frames are already dropped


class Encoder:
    """The encoder extractors, built once per actor; writes and commits one shard per call."""

    def __init__(self, cfg: ExtractConfig, fs_hash: str, out: str) -> None:
        import torch

        from extract.pipeline import build_extractors, describe_feature_set
        from shards.dataset import feature_set_hash

        if cfg.device.startswith("cuda"):
            cfg.device = "cuda"  # Ray shows this actor its own GPU only, as device 0
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.fs_hash, self.out = cfg, fs_hash, out
        self.extractors: dict[str, Any] = {}
        self._problem: str | None = None
        try:
            self.extractors = build_extractors(cfg)
        except ExtractionError as exc:  # e.g. a model missing on this node
            self._problem = f"the encoder on {os.uname().nodename}: {exc}"
            return
        found = feature_set_hash(describe_feature_set(cfg, self.extractors))
        if found != fs_hash:  # another model version or file on this node than on the driver's
            self._problem = (
                f"the encoder on {os.uname().nodename} has feature set {found}, the driver {fs_hash}: install the "
                "same mmfuse, packages and model files on every node of the Ray cluster"
            )

    def problem(self) -> str | None:
        """Why this encoder cannot write shards (``None``: it can); the driver asks before dispatching."""
        return self._problem

    def write(self, plan: Any, items: list[Any]) -> dict[str, Any]:
        """Write and commit the shard of ``plan``; ``items`` are, per clip in plan order, a reference to its
        decoding or (no media to decode) the :class:`DecodedClip` itself. Returns samples written and time spent
        waiting for decoded clips."""
        if self._problem:
            raise ExtractionError(self._problem)
        from pathlib import Path

        import ray
        from ray.exceptions import RayActorError

        from extract.writer import ShardBuilder

        inject_fault(plan.name)
        builder = ShardBuilder(Path(self.out), plan, self.extractors, self.fs_hash, self.cfg, group=self.cfg.batch_size)
        waits = []
        try:
            for clip, item in zip(plan.clips, items, strict=True):
                asked = time.perf_counter()
                if isinstance(item, DecodedClip):
                    decoded = item
                else:
                    try:
                        decoded = ray.get(item)
                    except RayActorError:  # its decoder died on every attempt: as the local engine does
                        decoded = DecodedClip(clip, info={"skipped": CRASHED})
                waits.append(time.perf_counter() - asked)
                builder.add(decoded)
            samples = builder.finish()
        except BaseException:
            builder.abort()
            raise
        return {"shard": plan.name, "samples": samples, "first_clip_s": waits[0], "decode_wait_s": sum(waits)}
