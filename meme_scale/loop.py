"""The training loop, top to bottom: ``run`` = setup -> fit -> finish. train.py, tune and cluster call ``run``.

setup   process group, threads and precision, data, model, DeepSpeed engine, checkpoint, MLflow
fit     optimizer steps (``train_step``) with logging, evaluation and checkpoints until max_steps or a signal
finish  summary.json, the final export, the MLflow status, and a Slurm requeue if one was asked for
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .config import Config, deepspeed_config, dump_yaml, flatten
from .data.patterns import pattern_counts
from .data.shards import TrainStream, eval_batches, read_meta
from .data.storage import storage_for
from .data.workers import start_worker_server
from .engine import DistInfo, adam, all_gather_object, all_reduce_sum, broadcast_object, build_engine, init_distributed
from .evaluate import Evaluator, picture_grid, to_device
from .hardware import DTYPES, PrecisionChoice, configure_threads, resolve_precision
from .models import build_model, count_parameters, modality_specs, pick_pseudo_samples
from .preemption import StopFlag, requeue_slurm_job, requeue_wanted
from .progress import Progress
from .speed import apply_speed_options
from .tracking import TrackingUnavailable, open_tracker, tracking_problem

log = logging.getLogger("meme_scale")


class NonFiniteLossError(RuntimeError):
    """Raised after ``train.max_consecutive_nan`` non-finite losses in a row."""


@dataclass
class State:
    """What the loop advances and a checkpoint stores besides DeepSpeed's own state; listed once here."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: the next batch to read
    batch: int = 0
    samples: int = 0  # samples seen by this rank
    nan_skipped: int = 0
    run_id: str | None = None

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, saved[f.name])


@dataclass
class StepResult:
    """What one optimizer step (``train_step``) did, agreed over all ranks."""

    loss: torch.Tensor | None = None  # the last micro-batch's loss (a tensor: reading it would wait on the device)
    terms: dict = field(default_factory=dict)  # its logged terms, [sum, count] pairs
    skipped: int = 0  # micro-batches with a non-finite loss, skipped
    stop_requested: bool = False  # SIGUSR1/SIGTERM reached some rank
    requeue_wanted: bool = False  # ... and it was Slurm's time-limit warning, not a scancel


@dataclass
class Run:
    """Everything ``setup`` builds and ``fit``/``finish`` use."""

    cfg: Config
    info: DistInfo
    engine: object
    state: State
    tracker: object
    train_data: TrainStream
    evaluator: Evaluator
    progress: Progress
    stop: StopFlag
    precision: PrecisionChoice
    hardware: dict
    patterns: dict  # meta.json's counts of complete pairs and single-modality samples per split
    noise_rng: dict  # the training noise's RNG state, applied right before the first step
    window: _Window = None
    consecutive_nan: int = 0
    stopped_by: str | None = None
    requeue: bool = False
    t_start: float = field(default_factory=time.perf_counter)
    samples_at_start: int = 0

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def run(
    cfg: Config,
    resume: str | None = None,
    config_path: str | None = None,
    report=None,
    run_id: str | None = None,
    optim_from_config: bool = False,
) -> dict:
    """Trains ``cfg`` to ``train.max_steps`` (or until stopped) and returns the summary dict.

    ``resume``: None (start fresh; refuses a run dir that already has checkpoints), "auto" (newest
    complete checkpoint if any) or a checkpoint tag/path. ``report(metrics, step)`` is called on
    every rank after each evaluation (Ray Tune hooks in here). ``run_id``: an existing MLflow run to
    log into when the checkpoint names none (a sweep's child run). ``optim_from_config``: after a
    checkpoint loads, the optimizer takes ``cfg.optim`` again instead of the saved lr, betas and
    weight decay (PBT changes ``optim.lr`` between a trial's segments).
    """
    stop = StopFlag()  # first: a preemption warning during setup must stop the run, not kill it
    r = setup(cfg, stop, resume, config_path, run_id, optim_from_config)
    try:
        fit(r, report)
    except BaseException as e:
        _record_failure(r, e)
        raise
    finally:
        r.progress.close()
    return finish(r)


# -- setup ------------------------------------------------------------------------------------------
def setup(
    cfg: Config,
    stop: StopFlag,
    resume: str | None = None,
    config_path: str | None = None,
    run_id: str | None = None,
    optim_from_config: bool = False,
) -> Run:
    if cfg.data.num_workers:
        start_worker_server()  # imports in the background while the engine is set up
    info = init_distributed()
    _setup_logging(info)
    # a tracking server that does not answer is an error now, on every rank, not after the whole setup
    problem = (
        tracking_problem(cfg.run.tracking_uri, cfg.run.tracking_required, Path(cfg.run.dir)) if info.is_main else None
    )
    if problem := broadcast_object(problem):
        raise TrackingUnavailable(problem)
    hardware, precision = _choose_threads_and_precision(cfg, info)
    meta = read_meta(cfg.data.root, storage_for(cfg.data))
    names = [s.name for s in modality_specs(cfg.model, meta)]
    engine, n_params = _build_engine(cfg, info, precision, names)
    state, noise_rng = _restore(cfg, info, engine, resume, optim_from_config)
    record = {**hardware, **pattern_counts(meta)}  # what this run found: MLflow params, summary.json
    tracker = _open_tracking(cfg, info, state, run_id, config_path, record, n_params)
    train_data = TrainStream(
        cfg.data.root,
        cfg.data.train_split,
        cfg.train.micro_batch_size,
        **_stream_args(cfg, info, names),
        start_epoch=state.epoch,
        start_batch=state.batch,
    )
    evaluator = Evaluator(engine.module, cfg, info.rank, info.world_size, info.device, DTYPES[precision.precision])
    progress = Progress(cfg.train.max_steps, state.step, cfg.run.progress, enabled=info.is_main)
    return Run(
        cfg=cfg,
        info=info,
        engine=engine,
        state=state,
        tracker=tracker,
        train_data=train_data,
        evaluator=evaluator,
        progress=progress,
        stop=stop,
        precision=precision,
        hardware=hardware,
        patterns=pattern_counts(meta),
        noise_rng=noise_rng,
        samples_at_start=state.samples,
    )


def _choose_threads_and_precision(cfg: Config, info: DistInfo) -> tuple[dict, PrecisionChoice]:
    # threads first: the precision probe measures with the threads the run will have; rank 0 decides
    # the precision for all ranks, so a noisy probe cannot split them
    hardware = configure_threads(cfg.train.threads, info.rank, all_gather_object)
    precision = broadcast_object(resolve_precision(cfg.train.precision, info.device) if info.is_main else None)
    hardware |= {"precision": precision.precision, "precision_reason": precision.reason}
    if info.is_main:
        log.info(
            "precision %s: %s; %d compute thread(s) per rank (%s)",
            precision.precision,
            precision.reason,
            hardware["threads"],
            hardware["threads_reason"],
        )
    return hardware, precision


def _build_engine(cfg: Config, info: DistInfo, precision: PrecisionChoice, names: list[str]):
    specs = modality_specs(cfg.model, read_meta(cfg.data.root, storage_for(cfg.data)))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, specs)
    if cfg.model.pseudo_init == "data" and hasattr(model, "init_pseudo_samples"):
        model.init_pseudo_samples(initial_pseudo_samples(cfg, names))
    apply_speed_options(model, cfg.train)
    optimizer = adam(model.parameters(), cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
    engine = build_engine(model, optimizer, deepspeed_config(cfg, info.world_size, precision.precision))
    return engine, count_parameters(model)


def _restore(cfg: Config, info: DistInfo, engine, resume: str | None, optim_from_config: bool) -> tuple[State, dict]:
    """The state to continue from (a checkpoint's, or a fresh one) and the training noise's RNG state.

    The one place the training noise is seeded: a resumed rank continues its own saved stream; a fresh
    run, or a resume on another world size (no saved stream for this rank), seeds one per rank (and
    step), or every rank would draw the same noise. It is applied just before the first step, so the
    setup work in between (classifiers, loaders, trackers) can never shift it.
    """
    state = State()
    ckpt_dir = Path(cfg.run.dir) / "checkpoints"
    tag = _resume_tag(ckpt_dir, resume, info)
    if tag is None:
        torch.manual_seed(cfg.train.seed * 1000 + info.rank)
        return state, checkpoint.rng_state()
    saved = checkpoint.load(engine, ckpt_dir, tag, info.rank, info.world_size)
    if optim_from_config:
        checkpoint.apply_optim_settings(engine.optimizer, cfg.optim)
    state.load_state_dict(saved)
    if saved["world_size"] != info.world_size:  # positions were counted in the old per-rank batches
        state.epoch, state.batch = state.epoch + 1, 0
        torch.manual_seed((cfg.train.seed * 1000 + info.rank) * 1_000_003 + state.step)
    if info.is_main:
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)", ckpt_dir / tag, state.step, state.epoch, state.batch
        )
    return state, checkpoint.rng_state()


def _open_tracking(
    cfg: Config, info: DistInfo, state: State, run_id: str | None, config_path: str | None, found: dict, n_params: int
):
    run_dir = Path(cfg.run.dir)
    tags = {"model": cfg.model.name, "world_size": info.world_size}
    tracker = open_tracker(
        info.is_main,
        cfg.run.tracking_uri,
        run_dir,
        cfg.run.experiment,
        cfg.run.run_name,
        run_id=state.run_id or run_id,
        tags=tags,
        required=cfg.run.tracking_required,
    )
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        if state.run_id is None:
            tracker.log_params(
                {
                    **flatten(cfg),
                    "world_size": info.world_size,
                    "parameters": n_params,
                    **{k if k.startswith("patterns.") else f"resolved.{k}": v for k, v in found.items()},
                }
            )
            tracker.log_artifact(run_dir / "config.yaml")
            if config_path:
                tracker.log_artifact(config_path, "config")
        log.info(
            "model %s: %s parameters; %d rank(s); mlflow run %s",
            cfg.model.name,
            f"{n_params:,}",
            info.world_size,
            tracker.run_ref,
        )
    state.run_id = broadcast_object(tracker.run_ref)  # the MLflow id, or the queue's key while the server is away
    return tracker


def _stream_args(cfg: Config, info: DistInfo, names: list[str]) -> dict:
    return dict(
        modalities=names,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.train.seed,
        observed_fraction=cfg.data.observed_fraction,
        missing=cfg.data.missing,
        mask_seed=cfg.data.mask_seed,
        num_workers=cfg.data.num_workers,
        storage=storage_for(cfg.data),
    )


def initial_pseudo_samples(cfg: Config, names: list[str]) -> dict[str, torch.Tensor]:
    """N distinct training samples per modality, observed under the run's mask (DESIGN 1.2), the same on
    every rank: one rank's view of the first epoch, read until each modality has N."""
    one_rank = TrainStream(
        cfg.data.root,
        cfg.data.train_split,
        cfg.train.micro_batch_size,
        **{**_stream_args(cfg, DistInfo(0, 1, 0, torch.device("cpu")), names), "num_workers": 0},
    )
    first_epoch = (batch for epoch, _, batch in itertools.takewhile(lambda e: e[0] == 0, one_rank))
    try:
        return pick_pseudo_samples(first_epoch, names, cfg.model.pseudo_samples)
    except ValueError as e:
        raise ValueError(
            f"{cfg.data.root} ({cfg.data.train_split} split, data.observed_fraction="
            f"{cfg.data.observed_fraction}, data.missing={cfg.data.missing}): {e}"
        ) from None


# -- fit ----------------------------------------------------------------------------------------------
def fit(r: Run, report=None) -> None:
    """Optimizer steps until ``train.max_steps`` or a stop signal, logging, evaluating and checkpointing."""
    cfg, state = r.cfg, r.state
    stream = iter(r.train_data)
    r.window = _Window(r.info.device)
    r.t_start = time.perf_counter()
    checkpoint.set_rng_state(r.noise_rng)
    model = r.engine.module
    while state.step < cfg.train.max_steps:
        if hasattr(model, "set_step"):  # a baseline's KL warm-up follows the optimizer step
            model.set_step(state.step, cfg.train.max_steps)
        result = train_step(r, stream)
        state.step += 1
        r.window.time = time.perf_counter() - r.window.t0
        last = state.step == cfg.train.max_steps
        if _logs_at(state.step, cfg):
            metrics = r.window.reduce(r.info) | _engine_metrics(r)
            r.tracker.log_metrics(metrics, state.step)
            r.progress.update(state.step, metrics["samples_per_s"], metrics)
            r.window = _Window(r.info.device)
        if state.step % cfg.run.eval_every == 0 or last:
            metrics = _evaluate(r)
            if report is not None:
                report(metrics, state.step)
        if state.step % cfg.run.checkpoint_every == 0 or last or result.stop_requested:
            _save(r)
        if result.stop_requested:
            r.stopped_by, r.requeue = "signal", result.requeue_wanted
            return


def train_step(r: Run, stream) -> StepResult:
    """One optimizer step over ``train.grad_accum`` micro-batches; a micro-batch whose loss is not finite
    on some rank is skipped on every rank (so collectives stay matched) and replaced by the next one."""
    cfg, engine, state = r.cfg, r.engine, r.state
    result = StepResult()
    done = 0
    while done < cfg.train.grad_accum:
        t0 = time.perf_counter()
        epoch, index, batch = next(stream)
        r.window.data_wait += time.perf_counter() - t0
        batch = to_device(batch, r.info.device, DTYPES[r.precision.precision])
        loss, terms = engine(batch)
        state.epoch, state.batch = _position_after(r.train_data, epoch, index)
        state.samples += batch["observed"].shape[0]
        flags = torch.tensor([float(not torch.isfinite(loss)), float(r.stop.is_set), *r.stop.received_flags()])
        non_finite, stop, usr1, term = all_reduce_sum(flags).tolist()  # every rank acts on the same answer
        if stop:
            result.stop_requested, result.requeue_wanted = True, requeue_wanted(usr1, term)
        if non_finite:
            result.skipped += 1
            _skip_non_finite(r, epoch, index)
            continue
        r.consecutive_nan = 0
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary() and _logs_at(state.step + 1, cfg):
            r.window.grad_norm = _unreported_grad_norm(engine)
        engine.step()
        r.window.add(loss, terms, batch["observed"].shape[0])
        result.loss, result.terms = loss.detach(), terms
        done += 1
    return result


def _skip_non_finite(r: Run, epoch: int, index: int) -> None:
    r.state.nan_skipped += 1
    r.consecutive_nan += 1
    if r.info.is_main:
        log.warning("non-finite loss at step %d (epoch %d, batch %d): skipped", r.state.step, epoch, index)
    if r.consecutive_nan >= r.cfg.train.max_consecutive_nan:
        raise NonFiniteLossError(
            f"{r.consecutive_nan} consecutive non-finite losses (last at epoch {epoch}, batch {index} of "
            f"{r.cfg.data.root}); the last good checkpoint in {r.ckpt_dir} is intact"
        )


# -- finish -------------------------------------------------------------------------------------------
def finish(r: Run) -> dict:
    """summary.json, the export and the MLflow status on rank 0; then a Slurm requeue if USR1 asked for one."""
    info, state = r.info, r.state
    summary = {
        "status": "stopped" if r.stopped_by else "finished",
        "step": state.step,
        "stopped_by": r.stopped_by,
        "nan_skipped": state.nan_skipped,
        "wall_s": time.perf_counter() - r.t_start,  # this session's
        "mlflow_run_id": state.run_id,
        "tracking_uri": r.tracker.tracking_uri,
        "checkpoint": str(r.ckpt_dir / checkpoint.tag_for(state.step)),
        "run_dir": str(r.run_dir),
        "world_size": info.world_size,
        "hardware": r.hardware,
        "precision": r.precision.as_record(),
        "patterns": r.patterns,
    }
    new_samples = all_reduce_sum(torch.tensor([state.samples - r.samples_at_start])).item()
    summary["samples_per_s"] = new_samples / max(summary["wall_s"], 1e-9)
    summary["parameter_digest_per_rank"] = all_gather_object(parameter_digest(r.engine.module))
    if not info.is_main:
        return summary
    summary["final"] = r.tracker.final_metrics()  # what this process logged: the server may be away
    if r.stopped_by:
        r.tracker.finish("KILLED")
    else:
        export = checkpoint.export(r.ckpt_dir / checkpoint.tag_for(state.step), r.run_dir / "final" / "model.pt")
        r.tracker.log_artifact(export, "model")
        summary["export"] = str(export)
        r.tracker.finish("FINISHED")
    summary.update(r.tracker.summary_fields())  # the MLflow id (if the server has created the run) and what is queued
    (r.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "done: step %d; checkpoint %s; mlflow run %s at %s; pictures %s; summary %s",
        state.step,
        summary["checkpoint"],
        summary["mlflow_run_id"],
        r.tracker.tracking_uri,
        r.run_dir / "pictures",
        r.run_dir / "summary.json",
    )
    if r.stopped_by:  # last: Slurm stops this job as soon as the requeue goes through
        if r.requeue:  # only for Slurm's USR1 warning: a user's scancel (TERM) must not requeue
            requeue_slurm_job()
        else:
            log.info("stopped by SIGTERM (scancel or shutdown): not requeueing")
    return summary


def _record_failure(r: Run, error: BaseException) -> None:
    """The run's record says why it ended; the last good checkpoint stays as it was."""
    if not r.info.is_main:
        return
    r.tracker.finish("FAILED")
    r.run_dir.joinpath("summary.json").write_text(
        json.dumps(
            {
                "status": "failed",
                "error": f"{type(error).__name__}: {error}",
                "step": r.state.step,
                "hardware": r.hardware,
                "nan_skipped": r.state.nan_skipped,
                "mlflow_run_id": r.state.run_id,
                "run_dir": str(r.run_dir),
                "last_checkpoint": checkpoint.latest_tag(r.ckpt_dir),
                **r.tracker.summary_fields(),
            },
            indent=2,
        )
    )


# -- helpers --------------------------------------------------------------------------------------
class _Window:
    """Loss terms and timings since the last log line; reduced over ranks only when logged."""

    def __init__(self, device: torch.device):
        self.t0 = time.perf_counter()
        self.time = 0.0
        self.data_wait = 0.0
        self.grad_norm: torch.Tensor | None = None  # where DeepSpeed keeps none (fp32 without ZeRO)
        self.sums: torch.Tensor | None = None
        self.names: list[str] = []
        self.device = device

    def add(self, loss: torch.Tensor, terms: dict, n: int) -> None:
        rows = torch.stack(
            [
                torch.stack([loss.detach().float() * n, loss.new_tensor(float(n)).float()]),
                *(v.float() for v in terms.values()),
            ]
        )
        self.names = self.names or ["loss", *terms]
        self.sums = rows if self.sums is None else self.sums + rows

    def reduce(self, info: DistInfo) -> dict[str, float]:
        local = self.sums.cpu() if self.sums is not None else torch.zeros(1, 2)
        total = all_reduce_sum(torch.cat([local.flatten(), torch.tensor([self.time, self.data_wait])]))
        sums, (time_sum, wait_sum) = total[:-2].view(-1, 2), total[-2:].tolist()
        metrics = {name: s / c for name, (s, c) in zip(self.names, sums.tolist()) if c > 0}
        n_samples = sums[0, 1].item()
        mean_time = time_sum / info.world_size
        metrics["samples_per_s"] = n_samples / max(mean_time, 1e-9)
        metrics["samples_per_s_per_rank"] = metrics["samples_per_s"] / info.world_size
        metrics["data_wait_share"] = wait_sum / max(time_sum, 1e-9)
        return metrics


def _logs_at(step: int, cfg: Config) -> bool:
    return step % cfg.run.log_every == 0 or step == cfg.train.max_steps


def _unreported_grad_norm(engine) -> torch.Tensor | None:
    """The gradient norm before the optimizer step, where DeepSpeed computes none itself.

    Its fp16, bf16 and ZeRO optimizers keep one; a plain torch optimizer at ZeRO stage 0 does not.
    The gradients are all-reduced by now, so every rank gets the global norm. No host sync here.
    """
    if engine.zero_optimization_stage() > 0 or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else None


def _engine_metrics(r: Run) -> dict[str, float]:
    engine = r.engine
    metrics = {"lr": engine.get_lr()[0], "nan_skipped": r.state.nan_skipped}
    norm = engine.get_global_grad_norm()
    norm = norm if norm is not None else r.window.grad_norm
    if norm is not None:
        metrics["grad_norm"] = float(norm)
    if engine.fp16_enabled():
        metrics["loss_scale"] = float(engine.optimizer.cur_scale)
    if r.info.device.type == "cuda":
        metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        metrics["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return metrics


def _position_after(train_data: TrainStream, epoch: int, index: int) -> tuple[int, int]:
    """The data position of the batch after (epoch, index): what a checkpoint taken now resumes from."""
    return (epoch + 1, 0) if index + 1 >= train_data.steps_per_epoch(epoch) else (epoch, index + 1)


def _evaluate(r: Run) -> dict:
    cfg, step = r.cfg, r.state.step
    pictures = r.run_dir / "pictures"
    metrics = r.evaluator(cfg.run.eval_max_batches, histogram=pictures / f"relatedness_{step:08d}.png")
    if r.info.is_main:
        model = r.evaluator.model
        batch = next(
            iter(eval_batches(cfg.data.root, cfg.data.eval_split, 16, modalities=model.names, rank=0, world_size=1))
        )
        grid = picture_grid(model, batch, pictures / f"step_{step:08d}.png", r.info.device, r.evaluator.dtype)
        captions = grid.with_suffix(".txt") if grid is not None else None
        for path in (grid, captions, pictures / f"relatedness_{step:08d}.png"):
            if path is not None and path.exists():
                r.tracker.log_artifact(path, "pictures")
        r.tracker.log_metrics(metrics, step)
        (r.run_dir / "eval_report.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
        shown = ("loss", "coherence", "latent_accuracy", "w2")
        log.info(
            "eval at step %d: %s",
            step,
            " ".join(f"{k[5:]}={v:.3f}" for k, v in metrics.items() if any(w in k for w in shown)),
        )
    return metrics


def _save(r: Run) -> None:
    if r.info.is_main:  # a run queued while its server was away has been created by now
        r.state.run_id = r.tracker.run_ref
    meta = {**r.state.state_dict(), "world_size": r.info.world_size, "config": flatten(r.cfg)}
    meta.pop("step")  # checkpoint.save records the step itself
    checkpoint.save(r.engine, r.ckpt_dir, r.state.step, meta, r.info.rank, r.cfg.run.keep_checkpoints)


def _resume_tag(ckpt_dir: Path, resume: str | None, info: DistInfo) -> str | None:
    if resume in (None, "", "none"):
        if checkpoint.complete_tags(ckpt_dir):
            raise FileExistsError(
                f"{ckpt_dir} already holds checkpoints: pass --resume auto to continue that run, "
                "or choose another run.dir"
            )
        return None
    if resume == "auto":
        return checkpoint.latest_tag(ckpt_dir)
    tag = Path(resume).name
    if not (ckpt_dir / tag / checkpoint.MARKER).is_file():
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint {ckpt_dir / tag}")
    return tag


def parameter_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal on all ranks when data parallelism kept them in sync."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _setup_logging(info: DistInfo) -> None:
    level = logging.INFO if info.is_main else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {info.rank}] %(name)s: %(message)s", force=False)
    logging.getLogger("meme_scale").setLevel(level)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
