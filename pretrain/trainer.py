"""SSL pretraining: any registered method, seeded, resumable, single process or DDP.

- the dataset sits in memory as uint8 and views are made by :mod:`encoder_guard.augment` on whole batches,
  because PIL augmentation on 2 cores starves even a tiny encoder (``benchmarks/throughput.py``);
- the views of step ``s`` are drawn from a generator seeded by ``(seed, epoch, s, rank)``, and the rest
  (data order, checkpoints every ``train.checkpoint_every`` epochs and on Ctrl-C/SIGTERM, the NaN guard,
  precision, DDP) is :class:`encoder_guard.training.TrainLoop`'s, so a resumed run continues exactly as an
  uninterrupted one.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from encoder_guard.augment import ViewConfig, augment
from encoder_guard.checkpointing import check_run_dir
from encoder_guard.data import ImageDataset, load_dataset, take_subset
from encoder_guard.encoders import Encoder, make_spec, save_encoder
from encoder_guard.errors import EncoderGuardError
from encoder_guard.runs import RunDir
from encoder_guard.training import Step, TrainLoop, cosine_lr, init_distributed
from encoder_guard.utils import resolve_device, resolve_precision, seed_everything, step_generator
from pretrain.methods import SSL_METHODS, SSLMethod
from pretrain.optim import OPTIMIZERS

CHECKPOINT = "checkpoints/last.pt"


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
    """Poisoned pretraining (SSL-Backdoor with a patch, CTRL with the frequency trigger, CorruptEncoder's
    placement with ``poison.placement: corrupt``, its trigger repeated with ``poison.tile``): poisons
    ``poison.rate`` of the set, drawn from class ``poison.target``; writes the trigger and the poisoned indices to
    the run directory so that evaluation uses exactly this trigger."""
    from encoder_guard.triggers import build_trigger, save_trigger
    from encoder_guard.triggers.poison import poison_pretraining

    p = dict(cfg["poison"])
    trigger_cfg = {k: v for k, v in p.items() if k not in ("rate", "target", "placement", "object_scale", "tile")}
    trigger = build_trigger(trigger_cfg, ds.image_size, ds.channels)
    placement = p.get("placement") or "stamp"
    poisoned = poison_pretraining(ds, trigger, int(p["target"]), float(p["rate"]), int(cfg["seed"]), placement,
                                  float(p.get("object_scale") or 0.5), bool(p.get("tile")))
    if run.writes:
        save_trigger(trigger, run.file("trigger.safetensors"))
        run.write_json("poison.json", {"kind": p["kind"], "placement": placement, "tile": bool(p.get("tile")),
                                       "target": int(p["target"]),
                                       "rate": float(p["rate"]),
                                       "trigger": repr(trigger), **poisoned.report()})
    run.logger.info(f"poisoned {len(poisoned.indices)} of {len(ds)} images of class {p['target']} with {trigger!r}")
    return poisoned.dataset


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
    method = build_method(cfg, encoder).to(device, memory_format=layout)  # type: ignore[call-overload]
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
    base_lr, final_ratio = float(o["lr"]), float(o.get("final_lr_ratio", 0.0))
    opt = OPTIMIZERS.get(o["name"])(method, lr=base_lr, weight_decay=float(o.get("weight_decay", 0.0)),
                                     momentum=float(o.get("momentum", 0.9)))
    if info.world > 1 and train_cfg.get("sync_bn"):
        if device.type == "cuda":
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
        else:
            log.warning("train.sync_bn ignored: PyTorch's SyncBatchNorm runs on GPUs only; each CPU process keeps its "
                        "own BatchNorm statistics")
    method.train()
    loop = TrainLoop(method, opt, epochs=epochs, batch_size=batch, seed=seed, checkpoint=ckpt_path,
                     checkpoint_every=int(train_cfg.get("checkpoint_every", 1)),
                     lr=lambda s: cosine_lr(s, total, base_lr, warmup, final_ratio), precision=precision, device=device,
                     on_step_end=method.on_step_end, desc="pretrain", advice=f"lower optim.lr (now {o['lr']})", info=info)
    images = ds.images.to(device) if device.type == "cuda" else ds.images

    def step(rows: Tensor, at: Step) -> tuple[Tensor, dict[str, float]]:
        x = images[rows.to(images.device)].to(device, non_blocking=True).float().div_(255)
        g = step_generator(seed, 1 + at.epoch, at.step, info.rank, device=device)
        views = [augment(x, vc, g).contiguous(memory_format=layout) for vc in views_cfg]
        with loop.autocast():
            loss = loop.module(views)
        return loss, {"loss": loss.item()}

    log.info(
        f"pretraining {cfg['method']['name']} on {ds.name} ({len(ds)} images, {ds.channels}×{ds.image_size}²), "
        f"{sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M-parameter encoder, {epochs} epochs × "
        f"{steps_per_epoch} steps of {batch}, {info.world} process(es) on {device}, {precision}"
    )
    history = loop.run(step, len(ds), resume=resume)
    summary = {
        "method": cfg["method"]["name"],
        "dataset": ds.describe(),
        "epochs": epochs,
        "steps": history[-1]["step"] if history else 0,
        "batch_size": batch,
        "world_size": info.world,
        "precision": precision,
        "final_loss": history[-1]["loss"] if history else math.nan,
        "history": history,
        "train_seconds_since_resume": loop.seconds,
        "images_per_second": loop.images_per_second,
    }
    if info.main:
        save_encoder(encoder, out / "encoder.safetensors", {"run": str(out)})
        run.write_json("metrics.json", summary)
        log.info(f"encoder written to {out / 'encoder.safetensors'}")
    if info.world > 1:
        dist.barrier()
    return summary
