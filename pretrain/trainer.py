"""The pretraining loop: any registered SSL method, seeded, resumable, single process or DDP.

Design points (measured in benchmarks/throughput.py):
- the dataset sits in memory as uint8 and views are made by :mod:`pretrain.augment` on whole batches,
  because PIL augmentation on 2 cores starves even a tiny encoder;
- every random draw is a function of ``(seed, epoch)`` (data order) or ``(seed, step, rank)``
  (augmentation), so a run resumed from a checkpoint continues exactly as an uninterrupted one;
- a checkpoint is written every ``train.checkpoint_every`` epochs and when the run is interrupted
  (Ctrl-C, SIGTERM), and a NaN loss stops the run keeping the last good checkpoint.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from encoder_guard.checkpointing import SaveOnInterrupt, check_run_dir, load_state, save_state
from encoder_guard.data import ImageDataset, load_dataset, take_subset
from encoder_guard.encoders import Encoder, make_spec, save_encoder
from encoder_guard.errors import CheckpointError, EncoderGuardError, TrainingDivergedError
from encoder_guard.runs import RunDir
from encoder_guard.utils import autocast, resolve_device, resolve_precision, seed_everything, step_generator
from pretrain.augment import ViewConfig, augment
from pretrain.methods import SSL_METHODS, SSLMethod
from pretrain.optim import OPTIMIZERS, lr_at

CHECKPOINT = "checkpoints/last.pt"


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str | None) -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_name != "cpu" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def build_method(cfg: dict[str, Any], encoder: Encoder) -> SSLMethod:
    params = dict(cfg["method"])
    name = params.pop("name")
    cls = SSL_METHODS.get(name)
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "encoder")]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise EncoderGuardError(f"method {name} has no option(s) {', '.join(unknown)}; its options: {', '.join(valid)}")
    try:
        return cls(encoder, **params)
    except ValueError as exc:
        raise EncoderGuardError(f"method {name}: {exc}") from exc


def view_configs(cfg: dict[str, Any], n_views: int) -> list[ViewConfig]:
    aug = cfg.get("augment") or {}
    base = {k: v for k, v in aug.items() if not k.startswith("view")}
    try:
        return [ViewConfig(**{**base, **(aug.get(f"view{i + 1}") or {})}) for i in range(n_views)]
    except (TypeError, ValueError) as exc:
        raise EncoderGuardError(f"augment config: {exc}") from exc


def load_pretrain_data(cfg: dict[str, Any]) -> ImageDataset:
    d = cfg["data"]
    ds = load_dataset(d["dataset"], d.get("split", "train"), d.get("root"), d.get("image_size"))
    if d.get("fraction") is not None or d.get("count") is not None:
        ds = take_subset(ds, d.get("fraction"), d.get("count"), False, int(cfg["seed"]))
    return ds


def apply_poison(cfg: dict[str, Any], ds: ImageDataset, run: RunDir) -> ImageDataset:
    """Poisoned pretraining (SSL-Backdoor with a patch, CTRL with the frequency trigger): stamps the trigger
    on ``poison.rate`` of the set, drawn from class ``poison.target``; writes the trigger and the
    poisoned indices to the run directory so that evaluation uses exactly this trigger."""
    from encoder_guard.attacks.poison import poison_pretraining
    from encoder_guard.triggers import build_trigger, save_trigger

    p = dict(cfg["poison"])
    trigger_cfg = {k: v for k, v in p.items() if k not in ("rate", "target")}
    trigger = build_trigger(trigger_cfg, ds.image_size, ds.channels)
    poisoned = poison_pretraining(ds, trigger, int(p["target"]), float(p["rate"]), int(cfg["seed"]))
    if run.writes:
        save_trigger(trigger, run.file("trigger.safetensors"))
        run.write_json("poison.json", {"kind": p["kind"], "target": int(p["target"]), "rate": float(p["rate"]),
                                       "trigger": repr(trigger), **poisoned.report()})
    run.logger.info(f"poisoned {len(poisoned.indices)} of {len(ds)} images of class {p['target']} with {trigger!r}")
    return poisoned.dataset


def _save_checkpoint(path: Path, model: SSLMethod, opt: torch.optim.Optimizer, epoch: int, step_in_epoch: int, step: int, history: list) -> None:
    save_state(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                      "step_in_epoch": step_in_epoch, "step": step, "history": history})


def pretrain(cfg: dict[str, Any], out: str | os.PathLike, resume: bool = False, dataset: ImageDataset | None = None) -> dict[str, Any]:
    """Train an encoder with ``cfg`` into the run directory ``out``; returns the summary metrics.

    Writes ``out/config.yaml``, ``out/log.txt``, ``out/checkpoints/last.pt``, ``out/encoder.safetensors``
    and ``out/metrics.json`` (rank 0 only under DDP). ``resume=True`` continues from the checkpoint.
    ``dataset`` replaces ``cfg['data']`` (used by poisoning and tests).
    """
    train_cfg = cfg.get("train") or {}
    info = init_distributed(train_cfg.get("device"))
    out = Path(out)
    ckpt_path = out / CHECKPOINT
    check_run_dir(out, ckpt_path, resume)
    run = RunDir(out, cfg)
    log = run.logger
    seed = int(cfg["seed"])
    seed_everything(seed)
    if train_cfg.get("threads"):
        torch.set_num_threads(int(train_cfg["threads"]))
    device = resolve_device(train_cfg.get("device", "auto"))

    ds = dataset if dataset is not None else load_pretrain_data(cfg)
    ds = apply_poison(cfg, ds, run) if (cfg.get("poison") or {}).get("kind") not in (None, "none") else ds
    model_cfg = cfg["model"]
    spec = make_spec(model_cfg["backbone"], in_chans=ds.channels, input_size=ds.image_size,
                     ssl_method=cfg["method"]["name"],
                     **{k: v for k, v in model_cfg.items() if k not in ("backbone", "in_chans", "input_size")})
    encoder = Encoder(spec)
    precision = resolve_precision(train_cfg.get("precision"), device)
    layout = torch.channels_last if train_cfg.get("channels_last") else torch.contiguous_format
    method = build_method(cfg, encoder).to(device, memory_format=layout)
    views_cfg = view_configs(cfg, method.views)

    o = cfg["optim"]
    batch = int(o["batch_size"])
    if batch % info.world:
        raise EncoderGuardError(f"optim.batch_size {batch} must be divisible by the {info.world} processes")
    steps_per_epoch = len(ds) // batch
    if steps_per_epoch == 0:
        raise EncoderGuardError(f"dataset of {len(ds)} images is smaller than one batch of {batch}; lower optim.batch_size")
    epochs = int(o["epochs"])
    total = steps_per_epoch * epochs
    warmup = int(round(float(o.get("warmup_epochs", 0)) * steps_per_epoch))
    opt = OPTIMIZERS.get(o["name"])(method, lr=float(o["lr"]), weight_decay=float(o.get("weight_decay", 0.0)),
                                     momentum=float(o.get("momentum", 0.9)))

    start_epoch, start_i, step, history = 0, 0, 0, []
    if resume:
        state = load_state(ckpt_path)
        try:
            method.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{ckpt_path} was made with another config ({str(exc).splitlines()[0]}); resume with the run's own config.yaml") from exc
        opt.load_state_dict(state["optimizer"])
        start_epoch, start_i, step, history = state["epoch"], state["step_in_epoch"], state["step"], list(state["history"])
        log.info(f"resuming {out} at epoch {start_epoch + 1}, step {step}/{total}")

    model: torch.nn.Module = method
    if info.world > 1:
        if train_cfg.get("sync_bn") and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif train_cfg.get("sync_bn"):
            log.warning("train.sync_bn ignored: PyTorch's SyncBatchNorm runs on GPUs only; each CPU process keeps its own BatchNorm statistics")
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    images = ds.images.to(device) if device.type == "cuda" else ds.images
    log.info(
        f"pretraining {cfg['method']['name']} on {ds.name} ({len(ds)} images, {ds.channels}×{ds.image_size}²), "
        f"{sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M-parameter encoder, {epochs} epochs × "
        f"{steps_per_epoch} steps of {batch}, {info.world} process(es) on {device}, {precision}"
    )
    local = batch // info.world
    every = int(train_cfg.get("checkpoint_every", 1))
    bar = tqdm(total=total, initial=step, disable=not info.main, desc="pretrain", unit="step", dynamic_ncols=True,
               mininterval=1.0)
    t_train, n_seen = 0.0, 0
    epoch, i = start_epoch, start_i
    try:
        with SaveOnInterrupt():
            for epoch in range(start_epoch, epochs):
                method.train()
                perm = torch.randperm(len(ds), generator=step_generator(seed, epoch))
                losses = []
                i = start_i if epoch == start_epoch else 0
                while i < steps_per_epoch:
                    t0 = time.perf_counter()
                    idx = perm[i * batch : (i + 1) * batch][info.rank * local : (info.rank + 1) * local]
                    x = images[idx.to(images.device)].to(device, non_blocking=True).float().div_(255)
                    g = step_generator(seed, 1 + epoch, step, info.rank, device=device)
                    views = [augment(x, vc, g).contiguous(memory_format=layout) for vc in views_cfg]
                    lr = lr_at(step, total, warmup, float(o["lr"]), float(o.get("final_lr_ratio", 0.0)))
                    for group in opt.param_groups:
                        group["lr"] = lr
                    with autocast(device, precision):
                        loss = model(views)
                    if not torch.isfinite(loss):
                        raise TrainingDivergedError(
                            f"loss became {loss.item()} at step {step} (epoch {epoch + 1}); lower optim.lr (now {o['lr']}) "
                            f"and resume, or restart; the last good checkpoint {ckpt_path} is kept"
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    method.on_step_end(step, total)
                    step += 1
                    i += 1
                    losses.append(loss.item())
                    dt = time.perf_counter() - t0
                    t_train += dt
                    n_seen += batch
                    bar.update(1)
                    bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{losses[-1]:.3f}", lr=f"{lr:.3g}",
                                    img_s=f"{n_seen / max(t_train, 1e-9):.0f}", refresh=False)
                history.append({"epoch": epoch + 1, "loss": sum(losses) / max(1, len(losses)), "step": step})
                log.info(f"epoch {epoch + 1}/{epochs} loss {history[-1]['loss']:.4f}")
                if info.main and ((epoch + 1) % every == 0 or epoch + 1 == epochs):
                    _save_checkpoint(ckpt_path, method, opt, epoch + 1, 0, step, history)
    except KeyboardInterrupt:
        if info.main:
            at_end = i >= steps_per_epoch
            _save_checkpoint(ckpt_path, method, opt, epoch + 1 if at_end else epoch, 0 if at_end else i, step, history)
            log.info(f"interrupted at step {step}/{total}; checkpoint saved to {ckpt_path}; continue with --resume")
        raise
    finally:
        bar.close()

    summary = {
        "method": cfg["method"]["name"],
        "dataset": ds.describe(),
        "epochs": epochs,
        "steps": step,
        "batch_size": batch,
        "world_size": info.world,
        "precision": precision,
        "final_loss": history[-1]["loss"] if history else math.nan,
        "history": history,
        "train_seconds_this_session": t_train,
        "images_per_second": n_seen / t_train if t_train else None,
    }
    if info.main:
        save_encoder(encoder, out / "encoder.safetensors", {"run": str(out)})
        run.write_json("metrics.json", summary)
        log.info(f"encoder written to {out / 'encoder.safetensors'}")
    if info.world > 1:
        dist.barrier()
    return summary
