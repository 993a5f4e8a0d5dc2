"""The training loop, top to bottom: setup -> fit -> finish. train.py and tune.py both call ``run``."""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .config import Config, deepspeed_config, dump_yaml, flatten
from .data.shards import TrainStream, eval_batches, read_meta, start_worker_server
from .engine import DistInfo, all_gather_object, all_reduce_sum, broadcast_object, build_engine, init_distributed
from .evaluate import Evaluator, picture_grid, to_device
from .models import build_model, count_parameters, modality_specs
from .preemption import StopFlag, requeue_slurm_job, requeue_wanted
from .progress import Progress
from .speed import apply_speed_options
from .tracking import TrackingUnavailable, open_tracker, tracking_problem

log = logging.getLogger("meme_scale")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Raised after ``train.max_consecutive_nan`` non-finite losses in a row."""


@dataclass
class State:
    """Everything the loop advances; what a checkpoint stores besides DeepSpeed's own state."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: the next batch to read
    batch: int = 0
    samples: int = 0  # samples seen by this rank
    nan_skipped: int = 0
    run_id: str | None = None
    extra: dict = field(default_factory=dict)


def run(cfg: Config, resume: str | None = None, config_path: str | None = None, report=None,
        run_id: str | None = None, optim_from_config: bool = False) -> dict:
    """Trains ``cfg`` to ``train.max_steps`` (or until stopped) and returns the summary dict.

    ``resume``: None (start fresh; refuses a run dir that already has checkpoints), "auto" (newest
    complete checkpoint if any) or a checkpoint tag/path. ``report(metrics, step)`` is called on
    every rank after each evaluation (Ray Tune hooks in here). ``run_id``: an existing MLflow run to
    log into when the checkpoint names none (a sweep's child run). ``optim_from_config``: after a
    checkpoint loads, the optimizer takes ``cfg.optim`` again instead of the saved lr, betas and
    weight decay (PBT changes ``optim.lr`` between a trial's segments).
    """
    stop = StopFlag()  # first: a preemption warning during setup must stop the run, not kill it
    if cfg.data.num_workers:
        start_worker_server()  # imports in the background while the engine is set up
    info = init_distributed()
    _setup_logging(info)
    run_dir = Path(cfg.run.dir)
    # a tracking server that does not answer is an error now, on every rank, not after the whole setup
    problem = tracking_problem(cfg.run.tracking_uri, cfg.run.tracking_required, run_dir) if info.is_main else None
    if problem := broadcast_object(problem):
        raise TrackingUnavailable(problem)
    ckpt_dir = run_dir / "checkpoints"
    dtype = DTYPES[cfg.train.precision]

    # -- setup ------------------------------------------------------------------------------
    meta = read_meta(cfg.data.root)
    specs = modality_specs(cfg.model, meta)
    names = [s.name for s in specs]
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, specs)
    stream_args = dict(modalities=names, rank=info.rank, world_size=info.world_size, seed=cfg.train.seed,
                       observed_fraction=cfg.data.observed_fraction, missing=cfg.data.missing,
                       mask_seed=cfg.data.mask_seed, num_workers=cfg.data.num_workers)  # fmt: skip
    if cfg.model.pseudo_init == "data" and hasattr(model, "init_pseudo_samples"):
        first = next(iter(TrainStream(cfg.data.root, cfg.data.train_split, cfg.train.micro_batch_size,
                                      **{**stream_args, "rank": 0, "world_size": 1, "num_workers": 0})))  # fmt: skip
        model.init_pseudo_samples({**first[2], "observed": torch.ones_like(first[2]["observed"])})
    apply_speed_options(model, cfg.train)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                 weight_decay=cfg.optim.weight_decay)  # fmt: skip
    engine = build_engine(model, optimizer, deepspeed_config(cfg, info.world_size))

    state = State()
    tag = _resume_tag(ckpt_dir, resume, info)
    if tag is not None:
        saved = checkpoint.load(engine, ckpt_dir, tag, info.rank, info.world_size)
        if optim_from_config:
            checkpoint.apply_optim_settings(engine.optimizer, cfg.optim)
        state = State(step=saved["step"], epoch=saved["epoch"], batch=saved["batch"], samples=saved["samples"],
                      nan_skipped=saved["nan_skipped"], run_id=saved["run_id"])  # fmt: skip
        if saved["world_size"] != info.world_size:  # positions were counted in the old per-rank batches
            state.epoch, state.batch = state.epoch + 1, 0
            # no saved stream for this rank: seed one per rank (and step), or every rank would draw the same noise
            torch.manual_seed((cfg.train.seed * 1000 + info.rank) * 1_000_003 + state.step)
        if info.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt_dir / tag, state.step, state.epoch, state.batch)
    # The training noise starts here: a resumed rank continues its own saved stream, a fresh one is
    # seeded per rank. It is (re)applied just before the first step, so that setup work in between
    # (classifiers, loaders, trackers) can never shift it.
    if tag is None:
        torch.manual_seed(cfg.train.seed * 1000 + info.rank)
    start_rng = checkpoint.rng_state()

    tracker = open_tracker(info.is_main, cfg.run.tracking_uri, run_dir, cfg.run.experiment, cfg.run.run_name,
                           run_id=state.run_id or run_id, tags={"model": cfg.model.name, "world_size": info.world_size},
                           required=cfg.run.tracking_required)  # fmt: skip
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        if state.run_id is None:
            tracker.log_params({**flatten(cfg), "world_size": info.world_size, "parameters": count_parameters(model)})
            tracker.log_artifact(run_dir / "config.yaml")
            if config_path:
                tracker.log_artifact(config_path, "config")
        log.info("model %s: %s parameters; %d rank(s); mlflow run %s", cfg.model.name,
                 f"{count_parameters(model):,}", info.world_size, tracker.run_ref)  # fmt: skip
    state.run_id = broadcast_object(tracker.run_ref)  # the MLflow id, or the queue's key while the server is away

    # -- fit --------------------------------------------------------------------------------
    train_data = TrainStream(cfg.data.root, cfg.data.train_split, cfg.train.micro_batch_size,
                             start_epoch=state.epoch, start_batch=state.batch, **stream_args)  # fmt: skip
    stream = iter(train_data)
    progress = Progress(cfg.train.max_steps, state.step, cfg.run.progress, enabled=info.is_main)
    evaluator = Evaluator(engine.module, cfg, info.rank, info.world_size, info.device, dtype)
    window = _Window(info.device)
    consecutive_nan = 0
    stopped_by, requeue = None, False
    t_start, samples_at_start = time.perf_counter(), state.samples
    checkpoint.set_rng_state(start_rng)
    try:
        while state.step < cfg.train.max_steps:
            micro = 0
            while micro < cfg.train.grad_accum:
                t0 = time.perf_counter()
                epoch, index, batch = next(stream)
                window.data_wait += time.perf_counter() - t0
                batch = to_device(batch, info.device, dtype)
                loss, terms = engine(batch)
                state.epoch, state.batch = _position_after(train_data, epoch, index)
                state.samples += batch["observed"].shape[0]
                flags = all_reduce_sum(torch.tensor([float(not torch.isfinite(loss)), float(stop.is_set),
                                                     *stop.received_flags()]))  # fmt: skip
                if flags[0] > 0:  # every rank skips together, so collectives stay matched
                    state.nan_skipped += 1
                    consecutive_nan += 1
                    if info.is_main:
                        log.warning("non-finite loss at step %d (epoch %d, batch %d): skipped", state.step, epoch, index)
                    if consecutive_nan >= cfg.train.max_consecutive_nan:
                        raise NonFiniteLossError(
                            f"{consecutive_nan} consecutive non-finite losses (last at epoch {epoch}, batch {index} "
                            f"of {cfg.data.root}); the last good checkpoint in {ckpt_dir} is intact"
                        )
                    continue
                consecutive_nan = 0
                engine.backward(loss)
                if engine.is_gradient_accumulation_boundary() and _logs_at(state.step + 1, cfg):
                    window.grad_norm = _unreported_grad_norm(engine)
                engine.step()
                window.add(loss, terms, batch["observed"].shape[0])
                micro += 1
                if flags[1] > 0:
                    stopped_by = "signal"
                    requeue = requeue_wanted(flags[2].item(), flags[3].item())
            state.step += 1
            window.time = time.perf_counter() - window.t0

            if _logs_at(state.step, cfg):
                metrics = window.reduce(info) | _engine_metrics(engine, info, state, window)
                tracker.log_metrics(metrics, state.step)
                progress.update(state.step, metrics["samples_per_s"], metrics)
                window = _Window(info.device)
            if state.step % cfg.run.eval_every == 0 or state.step == cfg.train.max_steps:
                metrics = _evaluate(evaluator, cfg, info, tracker, run_dir, state.step)
                if report is not None:
                    report(metrics, state.step)
            if state.step % cfg.run.checkpoint_every == 0 or state.step == cfg.train.max_steps or stopped_by:
                state.run_id = tracker.run_ref if info.is_main else state.run_id  # created by now, if it was queued
                _save(engine, ckpt_dir, state, cfg, info)
            if stopped_by:
                break
    except BaseException as e:
        if info.is_main:  # the run's record says why it ended; the last good checkpoint stays as it was
            tracker.finish("FAILED")
            run_dir.joinpath("summary.json").write_text(json.dumps(
                {"status": "failed", "error": f"{type(e).__name__}: {e}", "step": state.step,
                 "nan_skipped": state.nan_skipped, "mlflow_run_id": state.run_id, "run_dir": str(run_dir),
                 "last_checkpoint": checkpoint.latest_tag(ckpt_dir), **tracker.summary_fields()}, indent=2))  # fmt: skip
        raise
    finally:
        progress.close()

    # -- finish -----------------------------------------------------------------------------
    summary = {"status": "stopped" if stopped_by else "finished", "step": state.step, "stopped_by": stopped_by,
               "nan_skipped": state.nan_skipped, "wall_s": time.perf_counter() - t_start,  # this session's
               "mlflow_run_id": state.run_id,
               "tracking_uri": tracker.tracking_uri, "checkpoint": str(ckpt_dir / checkpoint.tag_for(state.step)),
               "run_dir": str(run_dir), "world_size": info.world_size}  # fmt: skip
    new_samples = all_reduce_sum(torch.tensor([state.samples - samples_at_start])).item()
    summary["samples_per_s"] = new_samples / max(summary["wall_s"], 1e-9)
    summary["parameter_digest_per_rank"] = all_gather_object(parameter_digest(engine.module))
    if info.is_main:
        summary["final"] = tracker.final_metrics()  # what this process logged: the server may be away
        if stopped_by:
            tracker.finish("KILLED")
        else:
            export = checkpoint.export(ckpt_dir / checkpoint.tag_for(state.step), run_dir / "final" / "model.pt")
            tracker.log_artifact(export, "model")
            summary["export"] = str(export)
            tracker.finish("FINISHED")
        summary.update(tracker.summary_fields())  # the MLflow id (if the server has created the run) and what is queued
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("done: step %d; checkpoint %s; mlflow run %s at %s; pictures %s; summary %s", state.step,
                 summary["checkpoint"], summary["mlflow_run_id"], tracker.tracking_uri, run_dir / "pictures", run_dir / "summary.json")  # fmt: skip
        if stopped_by:  # last: Slurm stops this job as soon as the requeue goes through
            if requeue:  # only for Slurm's USR1 warning: a user's scancel (TERM) must not requeue
                requeue_slurm_job()
            else:
                log.info("stopped by SIGTERM (scancel or shutdown): not requeueing")
    return summary


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
        rows = torch.stack([torch.stack([loss.detach().float() * n, loss.new_tensor(float(n)).float()]),
                            *(v.float() for v in terms.values())])  # fmt: skip
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


def _engine_metrics(engine, info: DistInfo, state: State, window: _Window) -> dict[str, float]:
    metrics = {"lr": engine.get_lr()[0], "nan_skipped": state.nan_skipped}
    norm = engine.get_global_grad_norm()
    norm = norm if norm is not None else window.grad_norm
    if norm is not None:
        metrics["grad_norm"] = float(norm)
    if engine.fp16_enabled():
        metrics["loss_scale"] = float(engine.optimizer.cur_scale)
    if info.device.type == "cuda":
        metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        metrics["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return metrics


def _position_after(train_data: TrainStream, epoch: int, index: int) -> tuple[int, int]:
    """The data position of the batch after (epoch, index): what a checkpoint taken now resumes from."""
    return (epoch + 1, 0) if index + 1 >= train_data.steps_per_epoch(epoch) else (epoch, index + 1)


def _evaluate(evaluator: Evaluator, cfg: Config, info: DistInfo, tracker, run_dir: Path, step: int) -> dict:
    pictures = run_dir / "pictures"
    metrics = evaluator(cfg.run.eval_max_batches, histogram=pictures / f"relatedness_{step:08d}.png")
    if info.is_main:
        model = evaluator.model
        batch = next(iter(eval_batches(cfg.data.root, cfg.data.eval_split, 16, modalities=model.names, rank=0,
                                       world_size=1)))  # fmt: skip
        grid = picture_grid(model, batch, pictures / f"step_{step:08d}.png", info.device, evaluator.dtype)
        captions = grid.with_suffix(".txt") if grid is not None else None
        for path in (grid, captions, pictures / f"relatedness_{step:08d}.png"):
            if path is not None and path.exists():
                tracker.log_artifact(path, "pictures")
        tracker.log_metrics(metrics, step)
        (run_dir / "eval_report.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
        shown = ("loss", "coherence", "latent_accuracy", "w2")
        log.info("eval at step %d: %s", step, " ".join(f"{k[5:]}={v:.3f}" for k, v in metrics.items()
                                                          if any(w in k for w in shown)))  # fmt: skip
    return metrics


def _save(engine, ckpt_dir: Path, state: State, cfg: Config, info: DistInfo) -> None:
    meta = {"epoch": state.epoch, "batch": state.batch, "samples": state.samples, "nan_skipped": state.nan_skipped,
            "run_id": state.run_id, "world_size": info.world_size, "config": flatten(cfg)}  # fmt: skip
    checkpoint.save(engine, ckpt_dir, state.step, meta, info.rank, cfg.run.keep_checkpoints)


def _resume_tag(ckpt_dir: Path, resume: str | None, info: DistInfo) -> str | None:
    if resume in (None, "", "none"):
        if checkpoint.complete_tags(ckpt_dir):
            raise FileExistsError(f"{ckpt_dir} already holds checkpoints: pass --resume auto to continue that run, "
                                  "or choose another run.dir")  # fmt: skip
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
