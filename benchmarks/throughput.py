"""Pretraining throughput: the real loop vs raw forward+backward of the same model and batch.

- raw: SimCLR's forward+backward+SGD step on two pre-made view tensors (no data, no augmentation);
- tensor loop: ``pretrain()`` itself on Fashion-MNIST (indexing, batched augmentation, step, bookkeeping);
- PIL loop: lightly's ``SimCLRTransform`` in a 2-worker DataLoader feeding the same model, which is what
  a research script would do; shows whether PIL augmentation starves the model on this machine.

Usage: python benchmarks/throughput.py [--steps 30] [--batch 256]
Writes benchmarks/results/throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

from encoder_guard.config import load_config
from encoder_guard.data import load_dataset
from encoder_guard.encoders import Encoder, make_spec
from encoder_guard.utils import resolve_precision
from pretrain import pretrain
from pretrain.timing import step_seconds
from pretrain.trainer import build_method


def pil_step_time(cfg: dict, batch: int, steps: int, workers: int) -> float:
    from lightly.transforms import SimCLRTransform
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    ds = load_dataset("fashion-mnist", "train")
    tf = SimCLRTransform(input_size=ds.image_size, cj_prob=0.8, cj_strength=0.5, cj_sat=0.0, cj_hue=0.0,
                         min_scale=0.2, random_gray_scale=0.0, gaussian_blur=0.0,
                         normalize={"mean": [0.0], "std": [1.0]})

    class PilViews(Dataset):
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int):
            img = Image.fromarray(ds.images[i, 0].numpy(), mode="L")
            return tf(img)

    method = build_method(cfg, Encoder(make_spec(cfg["model"]["backbone"], in_chans=1, input_size=ds.image_size)))
    opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
    loader = DataLoader(PilViews(), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=False)
    it = iter(loader)

    def step() -> None:
        loss = method([v[:, :1] for v in next(it)])
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--preset", default="fmnist-tiny")
    ap.add_argument("--skip-pil", action="store_true")
    args = ap.parse_args()

    cfg = load_config(args.preset, "pretrain", [f"optim.batch_size={args.batch}"])
    raw = step_seconds(cfg, args.batch, args.steps, 28, 1)
    fp32 = load_config(args.preset, "pretrain", [f"optim.batch_size={args.batch}", "train.precision=fp32",
                                                 "train.channels_last=false"])
    raw_fp32 = step_seconds(fp32, args.batch, args.steps, 28, 1)
    precision = resolve_precision(cfg["train"].get("precision"), torch.device("cpu"))
    tmp = Path(tempfile.mkdtemp())
    try:
        loop_cfg = load_config(args.preset, "pretrain", [f"optim.batch_size={args.batch}", "optim.epochs=1",
                                                         f"data.count={args.batch * (args.steps + 3)}"])
        summary = pretrain(loop_cfg, tmp / "run")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    loop_step = args.batch / summary["images_per_second"]
    pil = None if args.skip_pil else pil_step_time(cfg, args.batch, max(5, args.steps // 3), workers=2)
    data = {
        "preset": args.preset, "batch": args.batch, "steps": args.steps,
        "precision": precision, "channels_last": bool(cfg["train"].get("channels_last")),
        "raw_forward_backward_s_per_step": raw,
        "raw_fp32_contiguous_s_per_step": raw_fp32,
        "tensor_loop_s_per_step": loop_step,
        "tensor_loop_ratio": raw / loop_step,
        "pil_loop_s_per_step": pil,
        "pil_loop_ratio": (raw / pil) if pil else None,
    }
    lines = [
        f"## Pretraining throughput ({args.preset}, batch {args.batch}, two views)",
        "| loop | s/step | images/s | ratio to raw fwd+bwd |",
        "|---|---|---|---|",
        f"| raw forward+backward (pre-made tensors), {precision}, channels_last={data['channels_last']} "
        f"| {raw:.3f} | {args.batch / raw:.0f} | 1.00 |",
        f"| same in fp32, contiguous layout | {raw_fp32:.3f} | {args.batch / raw_fp32:.0f} "
        f"| {raw / raw_fp32:.2f} |",
        f"| encoder_guard loop (batched tensor augmentation) | {loop_step:.3f} | {args.batch / loop_step:.0f} | {raw / loop_step:.2f} |",
    ]
    if pil:
        lines.append(f"| lightly SimCLRTransform (PIL), DataLoader 2 workers | {pil:.3f} | {args.batch / pil:.0f} | {raw / pil:.2f} |")
    write_result("throughput", data, lines)


if __name__ == "__main__":
    main()
