"""The one resumable training loop behind pretraining, BadEncoder and distillation defenses.

A job hands the loop its model, optimiser and a *step*: a function from the indices of one batch to a loss.
The loop does everything the three kinds of job share, the same way for each:

- **data order**: epoch ``e`` visits the samples in ``randperm(n)`` drawn from a generator seeded by
  ``(seed, e)``; that generator is handed on to the step for its own draws (views, noise), and its state
  is checkpointed, so a run resumed mid-epoch draws what the uninterrupted run would have drawn;
- **learning rate**: a pure function of the step (:func:`cosine_lr`: linear warm-up, cosine decay), so a
  resumed run sets exactly the rate it would have had; ``None`` keeps the optimiser's rate;
- **checkpoints**: every ``checkpoint_every`` epochs and on Ctrl-C or SIGTERM, written atomically and read
  back with ``torch.load(weights_only=True)``; a signal stops the run at the end of its step, and an
  interruption raised inside a step rolls back what the step had drawn and what its forward pass did to
  BatchNorm statistics, so a resumed run repeats that step exactly;
- **a NaN guard**: a non-finite loss stops the run before the optimiser step, with advice, keeping the last
  good checkpoint;
- **progress**: a progress bar, and one log line per epoch with the mean of every loss term;
- **precision**: :meth:`TrainLoop.autocast` for the step to wrap its network calls in (losses stay fp32);
- **weight averaging**: with ``ema`` > 0 an exponential moving average of a module's weights and BatchNorm
  statistics (torch's ``AveragedModel``) is kept and copied into the module at the end;
- **distributed data parallel** under ``torchrun``: the model is wrapped in ``DistributedDataParallel``
  (the step calls :attr:`TrainLoop.module`), each process takes its slice of every batch, and only rank 0
  writes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from encoder_guard.checkpointing import StopOnSignal, load_state, save_state
from encoder_guard.errors import CheckpointError, TrainingDivergedError
from encoder_guard.runs import get_logger
from encoder_guard.utils import autocast, step_generator


@dataclass
class DistInfo:
    """This process's place in a ``torchrun`` job (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str | None = None) -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_name != "cpu" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, final_ratio: float = 0.0) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine decay to ``final_ratio * base_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return base_lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Step:
    """Where the loop is when it calls the step function."""

    epoch: int  # 0-based
    index: int  # step within the epoch
    step: int  # global step
    total: int  # steps in the whole run
    generator: torch.Generator  # the epoch's generator (it drew the data order; the step may draw from it)


StepFn = Callable[[Tensor, Step], tuple[Tensor, dict[str, float]]]


class TrainLoop:
    """Args:
        model: the module whose state is checkpointed (and wrapped for DDP); it is trained in place.
        optimizer: over the trainable parameters of ``model``.
        epochs / batch_size / seed: the schedule; ``batch_size`` is global (split over processes).
        checkpoint: the checkpoint file; ``checkpoint_every``: epochs between regular checkpoints.
        lr: the learning rate of each step (``None``: the optimiser's own, constant).
        precision: ``fp32`` or ``bf16`` (the autocast the step may use).
        device: where the step's tensors live.
        ema: decay of an exponential moving average of ``ema_of`` (default ``model``) per step; 0 turns it off.
        on_step_end: called with ``(step, total)`` after each optimiser step (BYOL's momentum update).
        desc: the progress bar's and log lines' label; advice: what the NaN error tells the user to change.
        info: the process's rank and world size (:func:`init_distributed`).

    The step function gets the indices of this process's share of the batch and a :class:`Step`, and
    returns the loss to minimise and the floats to log (mean per epoch in the history).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, epochs: int, batch_size: int, seed: int,
                 checkpoint: Path, checkpoint_every: int = 1, lr: Callable[[int], float] | None = None,
                 precision: str = "fp32", device: torch.device | str = "cpu", ema: float = 0.0,
                 ema_of: nn.Module | None = None, on_step_end: Callable[[int, int], None] | None = None,
                 desc: str = "train", advice: str = "lower the learning rate", info: DistInfo | None = None) -> None:
        if epochs < 1 or batch_size < 1 or checkpoint_every < 1:
            raise ValueError(f"epochs, batch_size and checkpoint_every must be >= 1 (got {epochs}, {batch_size}, "
                             f"{checkpoint_every})")
        if not 0 <= ema < 1:
            raise ValueError(f"ema is a decay in [0, 1) (0: off), not {ema}")
        self.model, self.optimizer = model, optimizer
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.checkpoint, self.checkpoint_every = Path(checkpoint), checkpoint_every
        self.lr, self.precision, self.device = lr, precision, torch.device(device)
        self.on_step_end, self.desc, self.advice = on_step_end, desc, advice
        self.info = info or DistInfo()
        if batch_size % self.info.world:
            raise ValueError(f"batch size {batch_size} must be divisible by the {self.info.world} processes")
        self.ema_of = ema_of if ema_of is not None else model
        self.averaged = (AveragedModel(self.ema_of, multi_avg_fn=get_ema_multi_avg_fn(ema), use_buffers=True)
                         if ema > 0 else None)
        self.module: nn.Module = model
        if self.info.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.seconds = 0.0  # time spent in steps by this process (since the start or the resume)
        self.samples = 0

    def autocast(self) -> torch.autocast:
        """Mixed precision for the step's network calls (a disabled context under fp32)."""
        return autocast(self.device, self.precision)

    @property
    def images_per_second(self) -> float | None:
        return self.samples / self.seconds if self.seconds else None

    def _save(self, epoch: int, index: int, step: int, history: list[dict[str, float]], sums: dict[str, float],
              count: int, generator: torch.Generator | None) -> None:
        if not self.info.main:
            return
        state: dict[str, Any] = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                 "epoch": epoch, "step_in_epoch": index, "step": step, "history": history,
                                 "epoch_sums": sums, "epoch_count": count}
        if generator is not None:
            state["generator"] = generator.get_state()
        if self.averaged is not None:
            state["ema"] = self.averaged.state_dict()
        save_state(self.checkpoint, state)

    def _restore(self) -> dict[str, Any]:
        state = load_state(self.checkpoint)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{self.checkpoint} was made with another config ({str(exc).splitlines()[0]}); "
                                  "resume with the run's own config.yaml") from exc
        if self.averaged is not None:
            if "ema" not in state:
                raise CheckpointError(f"{self.checkpoint} was saved without a weight average; resume with the ema it "
                                      "was started with (0) or start a new run")
            self.averaged.load_state_dict(state["ema"])
        return state

    def run(self, step_fn: StepFn, n: int, resume: bool = False) -> list[dict[str, float]]:
        """Train over ``n`` samples; returns one history entry per epoch (``epoch``, ``step``, the logged means).

        ``resume`` continues from :attr:`checkpoint` when it exists (mid-epoch too).
        """
        log = get_logger()
        steps = max(1, n // self.batch_size)
        total = steps * self.epochs
        local = self.batch_size // self.info.world
        start_epoch, start_index, step, history = 0, 0, 0, []
        sums: dict[str, float] = {}
        count = 0
        saved_generator = None
        if resume and self.checkpoint.exists():
            state = self._restore()
            start_epoch, start_index, step = state["epoch"], state["step_in_epoch"], state["step"]
            history = list(state["history"])
            if start_index:
                sums, count = dict(state.get("epoch_sums", {})), int(state.get("epoch_count", 0))
                saved_generator = state.get("generator")
            log.info(f"{self.desc}: resuming at epoch {start_epoch + 1}/{self.epochs}, step {step}/{total}")
        bar = tqdm(total=total, initial=step, disable=not self.info.main, desc=self.desc, unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        epoch, index, g = start_epoch, start_index, None
        try:
            with StopOnSignal() as stop:
                for epoch in range(start_epoch, self.epochs):
                    g = step_generator(self.seed, epoch)
                    perm = torch.randperm(n, generator=g)
                    index = start_index if epoch == start_epoch else 0
                    if index and saved_generator is not None:
                        g.set_state(saved_generator)
                    if epoch != start_epoch or not index:
                        sums, count = {}, 0
                    while index < steps:
                        if stop.requested:  # between two steps: nothing is half done
                            raise KeyboardInterrupt
                        t0 = time.perf_counter()
                        rows = perm[index * self.batch_size : (index + 1) * self.batch_size]
                        rows = rows[self.info.rank * local : (self.info.rank + 1) * local]
                        lr = None
                        if self.lr is not None:
                            lr = self.lr(step)
                            for group in self.optimizer.param_groups:
                                group["lr"] = lr
                        drawn, buffers = g.get_state(), [b.detach().clone() for b in self.model.buffers()]
                        try:
                            loss, parts = step_fn(rows, Step(epoch, index, step, total, g))
                        except KeyboardInterrupt:  # nothing of this step stays: it is run again on resume
                            g.set_state(drawn)
                            with torch.no_grad():
                                for b, saved in zip(self.model.buffers(), buffers):
                                    b.copy_(saved)
                            raise
                        if not torch.isfinite(loss):
                            raise TrainingDivergedError(
                                f"{self.desc}: the loss became {loss.item()} at step {step} (epoch {epoch + 1}); "
                                f"{self.advice}, then resume or restart; the last good checkpoint {self.checkpoint} is kept")
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        self.optimizer.step()
                        if self.averaged is not None:
                            self.averaged.update_parameters(self.ema_of)
                        if self.on_step_end is not None:
                            self.on_step_end(step, total)
                        step += 1
                        index += 1
                        for k, v in parts.items():
                            sums[k] = sums.get(k, 0.0) + v
                        count += 1
                        self.seconds += time.perf_counter() - t0
                        self.samples += self.batch_size
                        bar.update(1)
                        post = {"epoch": f"{epoch + 1}/{self.epochs}", "loss": f"{loss.item():.3f}"}
                        if lr is not None:
                            post["lr"] = f"{lr:.3g}"
                        post["img_s"] = f"{self.samples / max(self.seconds, 1e-9):.0f}"
                        bar.set_postfix(post, refresh=False)
                    history.append({"epoch": epoch + 1, "step": step, **{k: v / max(1, count) for k, v in sums.items()}})
                    log.info(f"{self.desc}: epoch {epoch + 1}/{self.epochs} "
                             + " ".join(f"{k} {v:.4f}" for k, v in history[-1].items() if k not in ("epoch", "step")))
                    if (epoch + 1) % self.checkpoint_every == 0 or epoch + 1 == self.epochs:
                        self._save(epoch + 1, 0, step, history, {}, 0, None)
                    if stop.requested and epoch + 1 < self.epochs:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            at_end = index >= steps
            if at_end:  # the epoch's steps were all done: the next one starts afresh
                self._save(epoch + 1, 0, step, history, {}, 0, None)
            else:
                self._save(epoch, index, step, history, sums, count, g)
            if self.info.main:
                log.info(f"{self.desc}: interrupted at step {step}/{total}; checkpoint saved to {self.checkpoint}; "
                         "continue with --resume")
            raise
        finally:
            bar.close()
        if self.averaged is not None:
            self.ema_of.load_state_dict(self.averaged.module.state_dict())
        return history
