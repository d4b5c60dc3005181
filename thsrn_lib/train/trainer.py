"""The training loop: one :class:`Trainer` for every model, on one CPU/GPU or under ``torchrun``.

Per step: encode the batch, score the b x b pairs, apply the bidirectional hinge loss (summed
violations during ``optim.warmup_steps``, then the hardest in-batch negative), backward (through
a gradient scaler with fp16), clip the global gradient norm, Adam step. The learning rate is set
per epoch (``lr * lr_decay ** #milestones passed``, SGRAF style).

Host-device syncs: losses are accumulated as device tensors and read once per ``run.log_every``
steps; nothing else in the inner loop waits for the GPU (fp16's gradient scaler must check for
overflow each step, which is why bf16 is preferred where the GPU has it).

Outputs in ``run.output_dir`` (written by rank 0 only):

* ``checkpoint_last.pt``: every epoch end, every ``run.checkpoint_every_steps``, at ``max_steps``
  and on SIGINT/SIGTERM (single process); everything needed to resume exactly.
* ``checkpoint_best.pt``: the epoch with the best end-of-epoch validation rsum so far.
* ``metrics.jsonl``: one JSON object per line, ``kind`` = ``train`` (every log step), ``val``
  (every validation), ``epoch`` (every epoch end); see :class:`MetricsLog`.
* ``config.yaml``: the resolved config of the run.
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..checkpoint import CHECKPOINT_FORMAT, load_checkpoint, model_payload, save_checkpoint
from ..errors import CheckpointError, ConfigError, DataError, ThsrnError
from ..losses import ContrastiveLoss
from ..utils.device import describe_device, resolve_amp_dtype, resolve_device
from ..utils.io import atomic_write
from ..utils.seed import derive_seed, get_rng_state, preserve_rng, seed_everything, set_rng_state
from .config import DATA_FILLED_FIELDS, TrainConfig
from .distributed import (
    DistInfo,
    EpochBatchSampler,
    all_gather_objects,
    barrier,
    cleanup_distributed,
    init_distributed,
)

__all__ = [
    "Trainer",
    "TrainResult",
    "TrainingError",
    "MetricsLog",
    "RankLoss",
    "train",
    "fill_model_config",
    "parameter_fingerprint",
]

LAST, BEST, METRICS, CONFIG = "checkpoint_last.pt", "checkpoint_best.pt", "metrics.jsonl", "config.yaml"
_RUN_FILES = (LAST, BEST, METRICS, CONFIG)

Callback = Callable[[str, dict[str, Any]], None]


class TrainingError(ThsrnError, RuntimeError):
    """Training cannot go on (diverged loss, out of memory); the last checkpoint stays valid."""


@dataclass
class TrainResult:
    """What a finished (or interrupted) run produced."""

    output_dir: Path
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_rsum: float | None
    best_epoch: int | None
    step: int
    epoch: int
    interrupted: bool = False
    last_val: dict[str, float] = field(default_factory=dict)
    is_main: bool = True  #: False on torchrun ranks other than 0 (which write nothing)

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS


class RankLoss:
    """The ranking criterion handed to ``model.training_loss``: scores in float32, negatives per phase.

    Autocast may give bf16/fp16 scores; summing a batch of hinge terms in those types loses
    precision, so the loss is always computed in float32.
    """

    def __init__(self, loss: ContrastiveLoss, max_violation: bool) -> None:
        self.loss = loss
        self.max_violation = max_violation

    def __call__(self, sims: Tensor, image_index: Tensor | None = None) -> Tensor:
        return self.loss(sims.float(), image_index, max_violation=self.max_violation)


class _LossModule(nn.Module):
    """Routes ``training_loss`` through ``forward`` so DistributedDataParallel sees the pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any, criterion: RankLoss) -> tuple[Tensor, dict[str, Tensor]]:
        return self.model.training_loss(batch, criterion)


class MetricsLog:
    """Append-only JSON-lines log (``metrics.jsonl``), one object per event, flushed per line.

    Lines carry ``kind`` (``train``/``val``/``epoch``), ``step`` (optimiser steps done), ``epoch``
    (0-based) and the numbers of that event. On resume, lines after the checkpoint's step (work
    that the resumed run redoes) are dropped, so a plot of the file has no duplicates.
    """

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self._fh = None

    def truncate_after(self, step: int) -> None:
        """Keep only complete lines with ``step <= step`` (rewritten atomically)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(obj, dict) and isinstance(obj.get("step"), int) and obj["step"] <= step:
                kept.append(line)
        with atomic_write(self.path, "w", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in kept))

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._fh.write(json.dumps(record, allow_nan=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def fill_model_config(model_name: str, model_config: Mapping[str, Any], vocab_size: int, img_dim: int,
                      num_regions: int, source: str = "the data") -> dict[str, Any]:
    """``model_config`` with ``vocab_size``/``img_dim``/``num_regions`` taken from the data.

    A value the recipe sets explicitly must equal the data's; otherwise :class:`ConfigError`.
    """
    from ..models import build_config

    fields_ = build_config(model_name, **model_config).to_dict()
    from_data = {"vocab_size": vocab_size, "img_dim": img_dim, "num_regions": num_regions}
    what = {"vocab_size": "words in the vocab", "img_dim": "feature dimension", "num_regions": "regions per image"}
    out = dict(model_config)
    for key in DATA_FILLED_FIELDS:
        if key not in fields_:
            continue
        if key in model_config and model_config[key] != from_data[key]:
            raise ConfigError(
                f"model_config.{key} = {model_config[key]!r} but {source} has {from_data[key]} {what[key]}; "
                f"remove model_config.{key} (it is filled from the data) or point data.root at matching data"
            )
        out[key] = from_data[key]
    return out


def _use_progress_bar(requested: bool) -> bool:
    if not requested:
        return False
    if "ipykernel" in sys.modules:
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[str(k)] = float(v)
        elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            out[str(k)] = float(v.item())
    return out


class Trainer:
    """Train one model from a :class:`TrainConfig`.

    Args:
        config: the run (see :mod:`thsrn_lib.train.config`).
        resume: continue from ``output_dir/checkpoint_last.pt`` (error if there is none).
        overwrite: start afresh in an ``output_dir`` that already holds a run (its checkpoints,
            metrics and config are deleted). Without it, such a folder is an error.
        callbacks: functions ``callback(kind, record)`` called on rank 0 with every record written
            to ``metrics.jsonl`` (``kind`` = ``train``, ``val``, ``epoch``) and with
            ``("checkpoint", {"path", "step", ...})`` after each checkpoint (e.g. live plots).
        progress: show a tqdm bar; None follows ``run.progress`` (shown only on a terminal or
            in Jupyter).

    ``fit()`` runs to the end (``optim.epochs`` or ``run.max_steps``) and returns a
    :class:`TrainResult`.
    """

    def __init__(
        self,
        config: TrainConfig,
        resume: bool = False,
        overwrite: bool = False,
        callbacks: Sequence[Callback] = (),
        progress: bool | None = None,
    ) -> None:
        if resume and overwrite:
            raise ConfigError("resume and overwrite exclude each other: resume continues the run in output_dir, overwrite deletes it")
        config.validate()
        self.config = config
        self.resume = resume
        self.overwrite = overwrite
        self.callbacks = list(callbacks)
        self.progress = config.run.progress if progress is None else progress
        self.output_dir = Path(config.run.output_dir or "runs/default")
        self._stop_signal: str | None = None

    # ------------------------------------------------------------------ public
    def fit(self) -> TrainResult:
        cfg = self.config
        self.dist = init_distributed(cfg.run.device)
        prev_deterministic = torch.are_deterministic_algorithms_enabled()
        prev_threads = torch.get_num_threads()
        if cfg.run.threads is not None:
            torch.set_num_threads(cfg.run.threads)
        try:
            with self._signal_handlers():
                return self._fit()
        finally:
            # Leave the process as found (notebooks run several trainings); the call is slow, so only if changed.
            if torch.are_deterministic_algorithms_enabled() != prev_deterministic:
                torch.use_deterministic_algorithms(prev_deterministic)
            if torch.get_num_threads() != prev_threads:
                torch.set_num_threads(prev_threads)
            cleanup_distributed(self.dist)

    # ------------------------------------------------------------------ setup
    def _say(self, text: str) -> None:
        if self.dist.is_main:
            print(text, flush=True)

    def _prepare_output_dir(self) -> dict[str, Any] | None:
        """Check/clean ``output_dir``; return the checkpoint to resume from (all ranks read it)."""
        out = self.output_dir
        last = out / LAST
        if self.resume:
            if not last.is_file():
                raise CheckpointError(
                    f"cannot resume: {last} does not exist (no checkpoint was written in {out} yet); "
                    "run without --resume to start training"
                )
            state = load_checkpoint(last, map_location="cpu")
            missing = [k for k in ("optimizer", "scheduler", "epoch", "step") if k not in state]
            if state.get("format") != CHECKPOINT_FORMAT or missing:
                raise CheckpointError(
                    f"cannot resume from {last}: it holds a model only ({state.get('format')!r}, lacking {missing}), "
                    "not a training checkpoint written by `thsrn train`"
                )
            return state
        existing = [n for n in (LAST, BEST) if (out / n).is_file()]
        if existing and not self.overwrite:
            raise ConfigError(
                f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, --overwrite to "
                "start again from scratch, or choose another run.output_dir"
            )
        if self.dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if self.overwrite:
                for name in _RUN_FILES:
                    (out / name).unlink(missing_ok=True)
        barrier(self.dist)
        return None

    def _clean_temp_files(self) -> None:
        # A kill during an atomic write leaves its hidden temporary file behind; it is garbage.
        for pattern in (f".{LAST}.*.tmp", f".{BEST}.*.tmp", f".{METRICS}.*.tmp", f".{CONFIG}.*.tmp"):
            for p in self.output_dir.glob(pattern):
                p.unlink(missing_ok=True)

    def _load_data(self) -> None:
        from ..data import PrecompDataset, Vocab, find_vocab

        d = self.config.data
        if not Path(d.root).is_dir():
            raise DataError(
                f"data.root {d.root} does not exist; generate the Scenes benchmark with "
                "`thsrn scenes --preset demo --out data/scenes` (then data.root=data/scenes/demo), or download the "
                "SCAN precomp features (docs/data.md) and point data.root at them"
            )
        vocab_path = find_vocab(d.root) if d.vocab == "auto" else Path(d.vocab)
        self.vocab = Vocab.load(vocab_path)
        self.vocab_path = vocab_path
        self.train_set = PrecompDataset(d.root, d.train_split, self.vocab, max_captions=None, check_finite=d.check_finite)
        self.val_set = None
        if d.val_split:
            self.val_set = PrecompDataset(
                d.root, d.val_split, self.vocab, max_captions=d.max_val_captions, check_finite=d.check_finite
            )

    def _build(self, state: dict[str, Any] | None) -> None:
        from ..models import create

        cfg = self.config
        ts = self.train_set
        model_config = fill_model_config(
            cfg.model, cfg.model_config, len(self.vocab), ts.feature_dim, ts.num_regions,
            source=f"the data in {cfg.data.root} (vocab {self.vocab_path})",
        )
        self.model = create(cfg.model, **model_config)
        self.model.prepare(ts)
        stored = self.model.config.to_dict()
        if state is not None:
            if state["model_name"] != cfg.model or state["config"] != stored:
                diff = sorted(k for k in set(stored) | set(state["config"]) if stored.get(k) != state["config"].get(k))
                raise CheckpointError(
                    f"cannot resume from {self.output_dir / LAST}: it holds a {state['model_name']!r} model whose config "
                    f"differs from this recipe's {cfg.model!r} model in {diff or ['model name']}; resume with the recipe "
                    "the run was started with, or start a new run in another output_dir"
                )
            if state.get("vocab") is not None and state["vocab"] != self.vocab.to_dict():
                raise CheckpointError(
                    f"cannot resume from {self.output_dir / LAST}: it was trained with another vocab than "
                    f"{self.vocab_path} (same size, different words or order); use the run's original vocab "
                    "(data.vocab) so that word ids keep their meaning"
                )
            try:
                self.model.load_state_dict(state["state_dict"], strict=True)
            except RuntimeError as exc:
                raise CheckpointError(
                    f"cannot resume from {self.output_dir / LAST}: weights do not fit the model ({str(exc).splitlines()[0]})"
                ) from None
        self.model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.optim.lr)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=cfg.optim.milestones(), gamma=cfg.optim.lr_decay
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        exclude = cfg.optim.exclude_same_image_negatives or bool(stored.get("exclude_same_image_negatives", False))
        self.loss = ContrastiveLoss(cfg.optim.margin, cfg.optim.max_violation, exclude_same_image=exclude)
        wrapped = _LossModule(self.model)
        if self.dist.is_distributed:
            self.step_module: nn.Module = nn.parallel.DistributedDataParallel(
                wrapped,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # The set of parameters a model uses is fixed for a run; a static graph lets DDP handle
                # parameters some switches leave unused without re-walking the graph every step.
                static_graph=True,
            )
        else:
            self.step_module = wrapped

    def _restore(self, state: dict[str, Any]) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"cannot resume from {self.output_dir / LAST}: optimizer/scheduler state does not fit ({exc}); "
                "was it written by `thsrn train`?"
            ) from None
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.step = int(state["step"])
        self.best_rsum = state.get("best_rsum")
        self.best_epoch = state.get("best_epoch")
        self.last_val = dict(state.get("metrics") or {})
        if state.get("log_window"):
            self._resumed_window = _Accumulator.from_state_dict(state["log_window"], self.device)
        rng = state.get("rng") or []
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            self._say(
                f"warning: the checkpoint was written by {saved_world} process(es), this run has "
                f"{self.dist.world_size}; training continues but not bit-identically (data shards and RNG differ)"
            )
        if rng:
            set_rng_state(rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0])
        if self.batch_in_epoch > self.sampler.num_batches():
            raise CheckpointError(
                f"cannot resume from {self.output_dir / LAST}: it stopped after batch {self.batch_in_epoch} of an epoch "
                f"that now has {self.sampler.num_batches()} batches (batch_size or data changed)"
            )
        changed = _changed_settings(state.get("train_config") or {}, self.config.to_dict())
        if changed:
            self._say(f"note: resuming with changed settings: {', '.join(changed)}")

    # ------------------------------------------------------------------ main loop
    def _fit(self) -> TrainResult:
        cfg = self.config
        self.device = resolve_device(cfg.run.device, self.dist.local_rank if self.dist.is_distributed else None)
        self.amp_dtype = resolve_amp_dtype(cfg.run.amp, self.device)
        state = self._prepare_output_dir()
        if self.dist.is_main:
            self._clean_temp_files()
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        self._load_data()
        self.sampler = EpochBatchSampler(
            len(self.train_set), cfg.optim.batch_size, cfg.run.seed, self.dist.rank, self.dist.world_size
        )
        self._build(state)
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.best_rsum: float | None = None
        self.best_epoch: int | None = None
        self.last_val: dict[str, float] = {}
        self._acc: _Accumulator | None = None
        self._resumed_window: _Accumulator | None = None
        if self.dist.is_distributed:
            # Same initial weights everywhere (DDP broadcasts them anyway), but each rank its own dropout stream.
            torch.manual_seed(derive_seed(cfg.run.seed, self.dist.rank, 1))
        if state is not None:
            self._restore(state)
        self.metrics = MetricsLog(self.output_dir / METRICS, enabled=self.dist.is_main)
        if self.dist.is_main:
            if state is not None:
                self.metrics.truncate_after(self.step)
            cfg_out = TrainConfig.from_dict(self.config.to_dict())
            cfg_out.model_config = self.model.config.to_dict()
            cfg_out.save(self.output_dir / CONFIG)
        self._print_header(resumed=state is not None)
        try:
            return self._loop()
        finally:
            self.metrics.close()

    def _print_header(self, resumed: bool) -> None:
        cfg = self.config
        n_params = sum(p.numel() for p in self.model.parameters())
        amp = {None: "off (float32)", torch.bfloat16: "bf16", torch.float16: "fp16 + grad scaler"}[self.amp_dtype]
        where = f"resuming at epoch {self.epoch}, step {self.step}" if resumed else "starting"
        procs = f", {self.dist.world_size} processes ({self.dist.backend})" if self.dist.is_distributed else ""
        val = f"{self.val_set.n_images} x {self.val_set.n_captions}" if self.val_set is not None else "none"
        self._say(
            f"thsrn train: {cfg.model} ({n_params:,} parameters) on {describe_device(self.device)}{procs}, amp {amp}\n"
            f"  data {cfg.data.root}: train {len(self.train_set):,} captions ({self.sampler.num_batches()} batches "
            f"of {cfg.optim.batch_size} per epoch), validation {val}\n"
            f"  {where}; output {self.output_dir}"
        )

    def _loop(self) -> TrainResult:
        cfg = self.config
        o, r = cfg.optim, cfg.run
        max_steps = r.max_steps
        done = self.epoch >= o.epochs or (max_steps is not None and self.step >= max_steps)
        if done:
            self._say("thsrn train: nothing to do, the run is already complete")
            return self._result(interrupted=False)
        use_bar = self._use_bar = self.dist.is_main and _use_progress_bar(self.progress)
        interrupted = False
        t_start = time.perf_counter()
        while self.epoch < o.epochs and not done:
            epoch = self.epoch
            self.sampler.set_epoch(epoch, self.batch_in_epoch)
            loader = DataLoader(
                self.train_set,
                batch_sampler=self.sampler,
                collate_fn=_collate(),
                num_workers=cfg.data.workers,
                pin_memory=self.device.type == "cuda",
                # A private generator: creating the iterator must not draw from the global RNG,
                # or an interrupted run and an uninterrupted one would see different dropout.
                generator=torch.Generator().manual_seed(derive_seed(r.seed, epoch, self.dist.rank, 2)),
            )
            bar = _make_bar(use_bar, self.sampler.num_batches(), self.batch_in_epoch, f"{cfg.model} epoch {epoch + 1}/{o.epochs}")
            acc = self._acc = self._resumed_window or _Accumulator(self.device)
            self._resumed_window = None
            t_log = time.perf_counter()
            try:
                for batch in loader:
                    acc.add(*self._train_step(batch))
                    self.step += 1
                    self.batch_in_epoch += 1
                    if bar is not None:
                        bar.update(1)
                    if self.step % r.log_every == 0:
                        now = time.perf_counter()
                        self._log_train(acc, now - t_log, bar, now - t_start)
                        acc = self._acc = _Accumulator(self.device)
                        t_log = now
                    end_of_epoch = self.batch_in_epoch == self.sampler.num_batches()
                    if r.val_every_steps and self.step % r.val_every_steps == 0 and not end_of_epoch:
                        self._validate(end_of_epoch=False)
                    stop = self._stop_signal is not None or (max_steps is not None and self.step >= max_steps)
                    if (r.checkpoint_every_steps and self.step % r.checkpoint_every_steps == 0 and not end_of_epoch) or (
                        stop and not end_of_epoch
                    ):
                        self._checkpoint(best=False)
                    if stop:
                        done = True
                        interrupted = self._stop_signal is not None
                        break
            finally:
                if bar is not None:
                    bar.close()
            if self.batch_in_epoch == self.sampler.num_batches():
                if acc.steps:
                    now = time.perf_counter()
                    self._log_train(acc, now - t_log, None, now - t_start)
                self._end_epoch(epoch)
        if done and self._stop_signal is not None:
            self._say(
                f"thsrn train: stopped by {self._stop_signal} at step {self.step}; checkpoint saved, "
                "continue with --resume"
            )
        self._check_replicas_in_sync()
        return self._result(interrupted=interrupted)

    def _train_step(self, batch: Any) -> tuple[Tensor, dict[str, Tensor], Tensor | None, int]:
        o = self.config.optim
        batch = batch.to(self.device, non_blocking=True)
        hardest = o.max_violation and self.step >= o.warmup_steps
        criterion = RankLoss(self.loss, hardest)
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            loss, parts = self.step_module(batch, criterion)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        grad_norm = None
        if o.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, o.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), parts, grad_norm, len(batch)

    # ------------------------------------------------------------------ logging
    def _emit(self, kind: str, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        if kind != "checkpoint":
            self.metrics.write(record)
        for cb in self.callbacks:
            cb(kind, record)

    def _log_train(self, acc: _Accumulator, seconds: float, bar: Any, elapsed: float) -> None:
        values = acc.means(self.dist)  # the one host sync of a logging window
        if values.get("loss") is not None and acc.all_nonfinite:
            raise TrainingError(
                f"the training loss is {values['loss']} for every step of the last {acc.steps} at step {self.step}; "
                f"training diverged. Lower optim.lr, use run.amp=off, or add optim.warmup_steps; "
                f"the last good checkpoint is {self.output_dir / LAST}"
            )
        pairs = acc.pairs * self.dist.world_size
        record = {
            "kind": "train",
            "step": self.step,
            "epoch": self.epoch,
            "epoch_progress": round(self.batch_in_epoch / self.sampler.num_batches(), 6),
            "lr": self.optimizer.param_groups[0]["lr"],
            **values,
            "hardest_negatives": bool(self.config.optim.max_violation and self.step > self.config.optim.warmup_steps),
            "pairs_per_s": pairs / seconds if seconds > 0 else None,
            "steps_per_s": acc.steps / seconds if seconds > 0 else None,
            "elapsed_s": round(elapsed, 3),
        }
        self._emit("train", record)
        if bar is not None:
            bar.set_postfix(loss=f"{values['loss']:.4g}", pairs_s=f"{record['pairs_per_s'] or 0:.0f}", refresh=False)
        elif self.dist.is_main and not self._use_bar:
            print(
                f"epoch {self.epoch} step {self.step} loss {values['loss']:.4f} lr {record['lr']:.2e} "
                f"{record['pairs_per_s'] or 0:.0f} pairs/s",
                flush=True,
            )

    # ------------------------------------------------------------------ validation / epochs
    def _validate(self, end_of_epoch: bool) -> dict[str, float] | None:
        """Validate in eval mode; returns the metrics (None without a validation split).

        Under torchrun every rank takes part: :func:`~thsrn_lib.evaluation.evaluate` scores a
        slice of the image rows on each rank and gathers the matrix, so all ranks get the metrics.
        """
        if self.val_set is None:
            return None
        from ..evaluation import evaluate

        t0 = time.perf_counter()
        self.model.eval()
        try:
            # Isolated RNG: validation must not shift the dropout masks of the following steps.
            with preserve_rng(), torch.no_grad():
                result = evaluate(
                    self.model,
                    self.val_set,
                    protocol="dev",
                    batch_size=self.config.run.val_batch_size,
                    device=self.device,
                    progress=self.dist.is_main and _use_progress_bar(self.progress),
                )
        finally:
            self.model.train()
        metrics = _plain_metrics(result.metrics)
        if "rsum" not in metrics:
            raise TrainingError(f"validation returned no 'rsum' (got {sorted(metrics)}); cannot select the best model")
        self.last_val = metrics
        record = {
            "kind": "val",
            "step": self.step,
            "epoch": self.epoch,
            "end_of_epoch": end_of_epoch,
            **metrics,
            "val_seconds": round(time.perf_counter() - t0, 3),
        }
        self._emit("val", record)
        self._say(
            f"validation at step {self.step} (epoch {self.epoch}): rsum {metrics['rsum']:.2f}"
            + "".join(f", {k} {metrics[k]:.1f}" for k in ("i2t_r1", "t2i_r1") if k in metrics)
            + f" ({record['val_seconds']:.1f} s)"
        )
        return metrics

    def _end_epoch(self, epoch: int) -> None:
        metrics = self._validate(end_of_epoch=True)
        is_best = False
        if metrics is not None and (self.best_rsum is None or metrics["rsum"] > self.best_rsum):
            self.best_rsum, self.best_epoch, is_best = metrics["rsum"], epoch, True
        self.scheduler.step()
        self._emit(
            "epoch",
            {
                "kind": "epoch",
                "step": self.step,
                "epoch": epoch,
                "rsum": None if metrics is None else metrics["rsum"],
                "best_rsum": self.best_rsum,
                "best_epoch": self.best_epoch,
                "is_best": is_best,
                "next_lr": self.optimizer.param_groups[0]["lr"],
            },
        )
        self.epoch = epoch + 1
        self.batch_in_epoch = 0
        self._checkpoint(best=is_best)

    # ------------------------------------------------------------------ checkpoints
    def _payload(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        cfg_dict = self.config.to_dict()
        cfg_dict["model_config"] = self.model.config.to_dict()
        payload = model_payload(self.model, self.vocab)
        payload.update(
            format=CHECKPOINT_FORMAT,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=rng,
            epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch,
            step=self.step,
            best_rsum=self.best_rsum,
            best_epoch=self.best_epoch,
            metrics=dict(self.last_val),
            train_config=cfg_dict,
            world_size=self.dist.world_size,
            log_window=self._acc.state_dict() if self._acc is not None else None,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        return payload

    def _checkpoint(self, best: bool) -> None:
        rng = all_gather_objects(self.dist, get_rng_state())  # every rank's generators, for exact resume
        if self.dist.is_main:
            payload = self._payload(rng)
            path = save_checkpoint(self.output_dir / LAST, payload)
            saved = {"path": str(path), "step": self.step, "epoch": self.epoch, "best": False}
            for cb in self.callbacks:
                cb("checkpoint", saved)
            if best:
                path = save_checkpoint(self.output_dir / BEST, payload)
                for cb in self.callbacks:
                    cb("checkpoint", {**saved, "path": str(path), "best": True})
        barrier(self.dist)

    def _check_replicas_in_sync(self) -> None:
        """Under DDP, compare a parameter fingerprint of every rank (cheap, once per run)."""
        if not self.dist.is_distributed:
            return
        fingerprint = parameter_fingerprint(self.model)
        prints = all_gather_objects(self.dist, fingerprint)
        print(f"rank {self.dist.rank}: parameter fingerprint {fingerprint}", flush=True)
        if self.dist.is_main and len(set(prints)) != 1:
            raise TrainingError(f"the {self.dist.world_size} processes ended with different weights: {prints}")

    def _result(self, interrupted: bool) -> TrainResult:
        out = self.output_dir
        return TrainResult(
            output_dir=out,
            last_checkpoint=(out / LAST) if (out / LAST).is_file() else None,
            best_checkpoint=(out / BEST) if (out / BEST).is_file() else None,
            best_rsum=self.best_rsum,
            best_epoch=self.best_epoch,
            step=self.step,
            epoch=self.epoch,
            interrupted=interrupted,
            last_val=dict(self.last_val),
            is_main=self.dist.is_main,
        )

    # ------------------------------------------------------------------ signals
    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        """SIGINT/SIGTERM finish the current step, save ``checkpoint_last.pt`` and stop.

        Only for a single process in the main thread: under torchrun the processes would see the
        signal at different steps and deadlock in the next collective, so they rely on the
        periodic checkpoints instead. A second SIGINT aborts at once.
        """
        if self.dist.is_distributed or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name
            print(f"\nthsrn train: {self._stop_signal} received; stopping after this step (again to abort)", file=sys.stderr)

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


# ---------------------------------------------------------------------- helpers
class _Accumulator:
    """Running sums of the step outputs as device tensors (no host sync until :meth:`means`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, Tensor] = {}
        self.steps = 0
        self.pairs = 0
        self.nonfinite: Tensor | None = None
        self.all_nonfinite = False

    def add(self, loss: Tensor, parts: Mapping[str, Tensor], grad_norm: Tensor | None, pairs: int) -> None:
        values = {"loss": loss, **parts}
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        for k, v in values.items():
            v = v.detach().float().reshape(())
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        bad = (~torch.isfinite(loss.detach())).to(torch.int32).reshape(())
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad
        self.steps += 1
        self.pairs += pairs

    def state_dict(self) -> dict[str, Any]:
        """The partial logging window, so that the first log line after a resume matches."""
        return {"sums": dict(self.sums), "steps": self.steps, "pairs": self.pairs, "nonfinite": self.nonfinite}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: torch.device) -> _Accumulator:
        acc = cls(device)
        acc.sums = {k: v.to(device) for k, v in state["sums"].items()}
        acc.steps, acc.pairs = int(state["steps"]), int(state["pairs"])
        acc.nonfinite = state["nonfinite"].to(device) if state["nonfinite"] is not None else None
        return acc

    def means(self, dist_info: DistInfo) -> dict[str, float]:
        if not self.steps:
            return {}
        keys = sorted(self.sums)
        vec = torch.stack([self.sums[k] for k in keys] + [self.nonfinite.float()])
        if dist_info.is_distributed:
            torch.distributed.all_reduce(vec)
            vec = vec / dist_info.world_size
        values = vec.tolist()
        self.all_nonfinite = values[-1] >= self.steps
        return {k: v / self.steps for k, v in zip(keys, values[:-1])}


def _collate() -> Callable:
    from ..data import collate

    return collate


def _make_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", dynamic_ncols=True, leave=False)


def _changed_settings(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    ignore = {"run.progress", "run.max_steps", "run.output_dir"}
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_settings(a, b, f"{name}.")
        elif a != b and name not in ignore and not name.startswith("model_config."):
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def parameter_fingerprint(model: nn.Module) -> str:
    """A short hex digest of every parameter (identical weights <=> identical digest).

    Buffers are left out: under DDP each rank updates its BatchNorm running statistics from its
    own batch and rank 0's are broadcast at the start of the next forward pass, so between steps
    they legitimately differ; rank 0's are the ones saved.
    """
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False, **kwargs: Any) -> TrainResult:
    """Train with :class:`Trainer` (``kwargs``: ``callbacks``, ``progress``)."""
    return Trainer(config, resume=resume, overwrite=overwrite, **kwargs).fit()

