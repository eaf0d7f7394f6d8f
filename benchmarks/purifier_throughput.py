"""Inference cost of Purifier+'s plug-ins: images/s of a purified encoder vs the same encoder without them.

Usage: python benchmarks/purifier_throughput.py --original runs/badencoder/encoder.safetensors \
           --purified runs/purifier-plus-no-rating-badencoder/encoder.safetensors \
           [--purified runs/purifier-plus-badencoder/encoder.safetensors ...]

(``encoder-guard defend purifier-plus-no-rating|purifier-plus --encoder runs/badencoder/encoder.safetensors --out RUN``.)

Times ``encoder(x)`` on batches of 512 Fashion-MNIST test images (no grad, eval mode; ``--device cuda``
synchronises before each clock read, so a batch's time includes its kernels). The encoders take
turns batch by batch (in alternating order), so that a noisy neighbour on a shared machine hits them
alike; the ratio is the median over batches of the paired ``original time / purified time``, and
images/s come from each encoder's median batch time.
Writes benchmarks/results/purifier_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

from encoder_guard.data import load_dataset
from encoder_guard.encoders import load_encoder


@torch.no_grad()
def seconds(encoder, batch) -> float:
    sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    encoder(batch)
    sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--original", required=True)
    ap.add_argument("--purified", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    encoders = {"original": load_encoder(args.original).eval().to(args.device)}
    for p in args.purified:
        encoders[p] = load_encoder(p).eval().to(args.device)
    x = load_dataset("fashion-mnist", "test").images[: args.images].float().div(255).to(args.device)
    batches = list(x.split(args.batch_size))
    for enc in encoders.values():
        for b in batches[:2]:
            seconds(enc, b)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in encoders}
    for r in range(args.rounds):
        for b in batches:
            for k in list(encoders)[:: 1 if r % 2 == 0 else -1]:
                times[k].append(seconds(encoders[k], b))
    base = times["original"]
    rows = [{"encoder": k, "plugins": list(encoders[k].spec.plugins), "images_per_second": args.batch_size / statistics.median(v),
             "ratio_to_original": statistics.median(o / t for o, t in zip(base, v))} for k, v in times.items()]
    where = torch.cuda.get_device_name() if x.is_cuda else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"## Inference throughput, {len(x)} images in batches of {args.batch_size}, {args.rounds} rounds, paired per "
             f"batch, {where}", "", "| encoder | plug-ins | images/s | ratio to original |", "|---|---|---|---|"]
    lines += [f"| {r['encoder']} | {', '.join(r['plugins']) or '-'} | {r['images_per_second']:.0f} "
              f"| {r['ratio_to_original']:.2f} |" for r in rows]
    write_result("purifier_throughput", {"rows": rows, "rounds": args.rounds, "images": len(x),
                                         "batch_size": args.batch_size, "device": where}, lines)


if __name__ == "__main__":
    main()
