"""``mmfuse extract --engine ray``: the local engine's plan and shard commits, run by Ray actors on a cluster.

The driver (this process) does what the local engine does before and after writing: :func:`prepare` reads the
manifest, builds the extractors for the feature set (on the CPU: only their provenance is needed here), plans
the shards, cleans ``--out`` and locks this rank's incomplete shards; :func:`finish_run` writes
``status.jsonl`` and ``dataset.json`` from the sidecars and returns the same summary. In between, one task per
incomplete planned shard goes to an encoder actor, fed by decoder actors (:mod:`extract.ray_actors`):

- each clip of the shard is submitted to a decoder (round-robin), which returns only the compact arrays;
- the shard's task goes to the encoder with the fewest shards in flight, with the references of its clips'
  decoding: it resolves them in plan order, encodes in batches and commits the shard;
- shards are dispatched ahead (two per encoder, and enough that every decoder has four clips queued), so the
  decoders work on the next shards while the encoders write.

Ray Core actors rather than Ray Data: a shard is a unit of commit, not a stream of rows, and with actors the
fault handling is two explicit numbers each. A decoder that dies (a decoder crash on a corrupt file, a lost
node) is restarted and every clip queued on it decoded again, up to :data:`DECODE_RETRIES` times; a clip
whose decoder died on every attempt is recorded as skipped, as the local engine does. An encoder that dies is
restarted (:data:`ENCODER_RESTARTS`) and its shard written again from the start (:data:`ENCODER_RETRIES`);
its temporary file is left to the cleaning of the next run. Errors raised on purpose are not retried.

Without ``--ray-address`` (or ``RAY_ADDRESS``), a local Ray is started for the run with as many CPUs as the
machine has (at least one per actor); with it, the driver joins that cluster, whose nodes must all see
``--out`` (a shared file system) and have the same packages and model files (the encoders check that their
feature set is the driver's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from extract.clip import quiet_native_logs
from extract.config import ExtractConfig, resolved
from extract.devices import DeviceError
from extract.extractors.base import DecodedClip, ExtractionError
from extract.pipeline import ExtractionJob, ShardPlan, finish_run, prepare
from extract.ray_actors import Decoder, Encoder
from shards import Progress

log = logging.getLogger(__name__)

DECODE_RETRIES = 2  # a clip lost with its decoder is decoded again up to twice
ENCODER_RESTARTS = 3  # a dead encoder is restarted up to 3 times over the run
ENCODER_RETRIES = 2  # a shard whose encoder died is written again up to twice
CLIPS_QUEUED_PER_DECODER = 4


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ExtractionError("--engine ray needs Ray: pip install 'mmfuse[ray]'") from None
    return ray


def run_extract_ray(
    manifest: Path | str,
    media_root: Path | str | None,
    out: Path | str,
    cfg: ExtractConfig,
    progress: Progress | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """:func:`extract.pipeline.run_extract` on Ray: same plan, shards, ``status.jsonl``, ``dataset.json`` and
    summary, plus ``engine``, ``ray_start_s`` (in ``setup_s`` too), ``decoders`` and ``encoders``.
    ``address``: a Ray cluster to join (default ``RAY_ADDRESS``, else a local Ray started for this run); a Ray
    already initialised in this process is used as it is."""
    ray = import_ray()
    out = Path(out)
    started, ray_start_s, decoders, encoders, locks, done_writing = False, 0.0, [], [], [], False
    began = time.perf_counter()  # set-up and wall time count from here, Ray's start included
    try:
        if not ray.is_initialized():
            tic = time.perf_counter()
            start_ray(ray, address or os.environ.get("RAY_ADDRESS"), cfg)
            started, ray_start_s = True, time.perf_counter() - tic
        # auto settings chosen once; the precision by the encoders' GPUs, not the driver's machine
        cfg = resolved(cfg.validate(), None if cfg.precision else cluster_precision(ray, cfg.device))
        job = prepare(manifest, media_root, out, dataclasses.replace(cfg, device="cpu"))  # provenance only
        job = dataclasses.replace(job, tic=began)
        locks = job.locks
        total = sum(len(p.clips) for p in job.mine)
        done = total - sum(len(p.clips) for p in job.todo)
        if progress is not None:
            progress(done, total)
        start_actors(ray, job, out, cfg, decoders, encoders)
        setup_s = time.perf_counter() - job.tic  # Ray's start and the encoders' model loading included
        written, timings = run_shards(ray, job, decoders, encoders, progress, done, total)
        done_writing = True
    finally:
        # Stopped early (Ctrl-C, an error): killing actors with tasks in flight makes Ray print a coloured
        # "(raylet) Task ... failed, retries remaining" line per task; the one line the command ends with is ours.
        with contextlib.nullcontext() if done_writing else quiet_native_logs(1, 2):
            for actor in decoders + encoders:
                ray.kill(actor)
            if started:
                ray.shutdown()
        for lock in locks if not done_writing else []:  # else finish_run releases them, holding dataset.lock
            lock.release()
    summary = finish_run(job, manifest, media_root, out, cfg, written, {"setup_s": setup_s, **timings})
    sizes = {"decoders": len(decoders), "encoders": len(encoders)}
    return {**summary, "engine": "ray", "ray_start_s": round(ray_start_s, 3), **sizes}


def cluster_precision(ray: Any, device: str) -> str:
    """The automatic encoder precision for the cluster: fp32 on CPUs; with ``--device cuda`` what a GPU of the
    cluster computes natively (bf16, else fp16), asked of that GPU by a one-GPU task (the driver may have none)."""
    from extract.auto import resolve_precision

    if not device.startswith("cuda"):
        return resolve_precision(None, device)
    if int(ray.cluster_resources().get("GPU", 0)) < 1:
        raise DeviceError(f"--device {device} was asked for but the Ray cluster has no GPU; use --device cpu")
    probe = ray.remote(num_gpus=1, num_cpus=0, max_retries=2)(resolve_precision)
    return ray.get(probe.remote(None, "cuda"))


def start_ray(ray: Any, address: str | None, cfg: ExtractConfig) -> None:
    """Join the cluster at ``address``, or start a local Ray with the machine's CPUs (at least one per actor).
    Ray's own logs stay out of the terminal unless ``mmfuse --log-level DEBUG`` asked for native logs."""
    show = os.environ.get("MMFUSE_NATIVE_LOGS") == "show"
    quiet = {"log_to_driver": show, "logging_level": logging.INFO if show else logging.ERROR}
    if address:
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as exc:
            raise ExtractionError(f"--ray-address {address}: no Ray cluster could be reached ({exc})") from None
        return
    wanted = _wanted_decoders(cfg, os.cpu_count() or 1) + 1
    # Ray's processes start ignoring SIGINT (an ignored signal stays ignored across exec): Ctrl-C in the terminal
    # reaches the whole process group, and the driver alone decides, stopping them with ray.shutdown.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, wanted), include_dashboard=False, **quiet)
    finally:
        signal.signal(signal.SIGINT, previous)


def _wanted_decoders(cfg: ExtractConfig, cpus: int) -> int:
    """``--workers N`` decoders (at least one: nothing runs inline under Ray); ``auto`` (the default): one per
    CPU of the cluster but one. The local engine's auto choice is this machine's, not the cluster's."""
    if "workers" not in cfg.auto and isinstance(cfg.workers, int):
        return max(1, cfg.workers)
    return max(1, cpus - 1)


def actor_counts(ray: Any, cfg: ExtractConfig, media: bool) -> tuple[int, int, int]:
    """``(decoders, encoders, gpus per encoder)`` for the cluster's resources: one encoder per GPU with
    ``--device cuda`` (else one, on a CPU), decoders as asked but no more than the CPUs left."""
    have = ray.cluster_resources()
    cpus, gpus = int(have.get("CPU", 0)), int(have.get("GPU", 0))
    if cfg.device.startswith("cuda"):
        if gpus < 1:
            raise DeviceError(f"--device {cfg.device} was asked for but the Ray cluster has no GPU; use --device cpu")
        encoders, per_gpu = gpus, 1
    else:
        encoders, per_gpu = 1, 0
    if not media:
        return 0, encoders, per_gpu
    wanted = _wanted_decoders(cfg, cpus - encoders + 1)
    decoders = max(1, min(wanted, cpus - encoders))
    if decoders < wanted:
        log.warning("the Ray cluster has %d CPUs: %d decoders instead of %d", cpus, decoders, wanted)
    return decoders, encoders, per_gpu


def start_actors(ray: Any, job: ExtractionJob, out: Path, cfg: ExtractConfig, decoders: list, encoders: list) -> None:
    """Start the decoder and encoder actors (appended to ``decoders`` and ``encoders``, so that the caller can
    stop them whatever happens) and wait until the encoders have loaded their models. ``MMFUSE_*`` variables
    of this process are passed on to the actors."""
    media = bool(job.settings.modalities)
    n_dec, n_enc, per_gpu = actor_counts(ray, cfg, media)
    env = {k: v for k, v in os.environ.items() if k.startswith(("MMFUSE_", "GLOG_", "TF_CPP_"))}
    runtime = {"runtime_env": {"env_vars": env}} if env else {}
    n_clips = sum(len(p.clips) for p in job.todo)
    decoder_cls = ray.remote(Decoder).options(
        num_cpus=1, max_restarts=(DECODE_RETRIES + 1) * max(n_clips, 1), max_task_retries=DECODE_RETRIES, **runtime
    )
    encoder_cls = ray.remote(Encoder).options(
        num_cpus=0 if per_gpu else 1,
        num_gpus=per_gpu,
        max_restarts=ENCODER_RESTARTS,
        max_task_retries=ENCODER_RETRIES,
        **runtime,
    )
    decoders += [decoder_cls.remote(job.settings) for _ in range(n_dec)]
    encoders += [encoder_cls.remote(cfg, job.fs_hash, str(out)) for _ in range(n_enc)]
    for problem in ray.get([e.problem.remote() for e in encoders]):
        if problem:
            raise ExtractionError(problem)
    log.info("ray: %d shards (%d clips) on %d decoders and %d encoders", len(job.todo), n_clips, n_dec, n_enc)


def run_shards(
    ray: Any,
    job: ExtractionJob,
    decoders: list,
    encoders: list,
    progress: Progress | None,
    done: int,
    total: int,
) -> tuple[int, dict[str, float]]:
    """Long: write every shard of ``job.todo`` with the decoder and encoder actors; return the samples written
    and where the encoders' time went (waiting for decoded clips)."""
    media = bool(job.settings.modalities)
    n_dec, n_enc, n_clips = len(decoders), len(encoders), sum(len(p.clips) for p in job.todo)
    queue = list(job.todo)
    inflight: dict[Any, tuple[ShardPlan, int]] = {}  # shard task -> (plan, encoder index)
    load = [0] * n_enc
    turn = 0
    written, shards_done, timings = 0, 0, {"first_clip_s": 0.0, "decode_wait_s": 0.0}
    tic = time.perf_counter()

    def clips_inflight() -> int:
        return sum(len(p.clips) for p, _ in inflight.values())

    while queue or inflight:
        while queue and (len(inflight) < 2 * n_enc or clips_inflight() < CLIPS_QUEUED_PER_DECODER * n_dec):
            plan = queue.pop(0)
            if media:
                items = []
                for clip in plan.clips:
                    items.append(decoders[turn % n_dec].decode.remote(clip))
                    turn += 1
            else:
                items = [DecodedClip(clip) for clip in plan.clips]
            k = load.index(min(load))
            load[k] += 1
            inflight[encoders[k].write.remote(plan, items)] = (plan, k)
        ready, _ = ray.wait(list(inflight), num_returns=1)
        plan, k = inflight.pop(ready[0])
        load[k] -= 1
        result = _result(ray, ready[0], plan)
        written += result["samples"]
        if shards_done == 0:
            timings["first_clip_s"] = result["first_clip_s"]
        timings["decode_wait_s"] += result["decode_wait_s"]
        shards_done += 1
        done += len(plan.clips)
        rate = (done - (total - n_clips)) / max(time.perf_counter() - tic, 1e-9)
        log.info("ray: %s committed (%d/%d shards, %d/%d clips, %.1f clips/s)",
                 plan.name, shards_done, len(job.todo), done, total, rate)  # fmt: skip
        if progress is not None:
            progress(done, total)
    return written, timings


def _result(ray: Any, ref: Any, plan: ShardPlan) -> dict[str, Any]:
    """A shard task's result; an error raised on purpose in the actor comes back as that error."""
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as exc:
        if isinstance(exc.cause, ExtractionError):
            raise ExtractionError(str(exc.cause)) from None
        raise
    except RayActorError as exc:
        raise ExtractionError(
            f"{plan.name}: its encoder died {ENCODER_RETRIES + 1} times ({str(exc).splitlines()[0]}). Complete "
            "shards are kept; rerun the same command to resume."
        ) from None
