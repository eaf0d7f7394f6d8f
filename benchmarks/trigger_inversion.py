"""Is the trigger the smallest input patch into its target? Mask inversion on backdoored and clean encoders.

Usage:
  python benchmarks/trigger_inversion.py --encoder bad=runs/badencoder/encoder.safetensors \
      --encoder clean=runs/clean/encoder.safetensors --trigger runs/badencoder/trigger.safetensors --target 0 --seeds 0 1 2

TAC's target test (``encoder_guard/defenses/tac.py``) looks for a class that every input is a small
*latent* shift away from; under a clean probe a backdoored encoder offers no such shift. This
asks the same question in input space, where a patch trigger is a shared change, with two inversions of
an input mask ``m`` and pattern ``p`` (stamped as ``(1 − m)·x + m·p``, Adam on ``sigmoid``
parameters, the L1 weight on ``m`` raised while the goal holds and lowered while it does not):

- ``class k`` (Neural Cleanse, Wang et al., S&P 2019): the deployed clean probe sends ≥ 95% of the
  reference images to class ``k``; per class, the smallest ``‖m‖₁`` that achieved it;
- ``collapse`` (DECREE, Feng et al., CVPR 2023, label-free): the stamped references' features, centred
  on the clean mean, reach a mean pairwise cosine ``≥ --collapse``.

A backdoor is detectable this way when the target's smallest mask is well below every other class's
and below what a clean encoder needs. Beside them, the real trigger's changed pixels and its success.
Writes benchmarks/results/trigger_inversion.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

from encoder_guard.encoders import load_encoder
from encoder_guard.threats import deployed_classifier, downstream_setup


def invert(goal: Callable[[Tensor], tuple[Tensor, bool]], x: Tensor, steps: int, lr: float = 0.1) -> float:
    """Smallest ``‖m‖₁`` at which ``goal`` held during ``steps`` of Adam on mask and pattern (inf: never)."""
    a = torch.full((1, 1, *x.shape[2:]), -3.0, requires_grad=True)
    b = torch.zeros(1, *x.shape[1:], requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=lr)
    lam, best = 1e-3, float("inf")
    for _ in range(steps):
        m = torch.sigmoid(a)
        loss, held = goal((1 - m) * x + m * torch.sigmoid(b))
        size = m.sum()
        opt.zero_grad()
        (loss + lam * size).backward()
        opt.step()
        if held:
            best, lam = min(best, float(size.detach())), lam * 1.2
        else:
            lam /= 1.2
    return best


def mean_cosine(z: Tensor) -> Tensor:
    """Mean pairwise cosine similarity of the rows of ``z`` (self-pairs excluded)."""
    z = F.normalize(z, dim=1)
    n = len(z)
    return ((z @ z.T).sum() - n) / (n * (n - 1))


def one(name: str, path: str, trigger_path: str, target: int, seed: int, args: argparse.Namespace) -> dict:
    encoder = load_encoder(path).eval()
    cfg = {"downstream": {"dataset": "fashion-mnist", "trigger": trigger_path, "target": target, "clean_fraction": 0.05}}
    ds = downstream_setup(cfg, encoder, seed)
    clf = deployed_classifier(cfg, encoder, ds, seed).eval()
    clf.requires_grad_(False)
    images = ds.data.clean.images[torch.randperm(len(ds.data.clean), generator=torch.Generator().manual_seed(seed))]
    x, pool = images[: args.refs].float() / 255, images[args.refs : args.refs + 1024].float() / 255
    trigger = ds.trigger
    with torch.no_grad():
        centre = encoder(pool).mean(0)
        stamped = trigger(x)
        feats = encoder(stamped)  # once, for both the probe's reading and the collapse
        trigger_pixels = float((stamped != x).any(1).float().sum((1, 2)).mean())
        trigger_hits = float((clf.head(feats).argmax(1) == target).float().mean())
        trigger_collapse = float(mean_cosine(feats - centre))
    t0 = time.perf_counter()
    per_class = []
    for k in range(clf.num_classes):
        labels = torch.full((len(x),), k)

        def to_class(xs: Tensor, labels: Tensor = labels, k: int = k) -> tuple[Tensor, bool]:
            z = clf(xs)
            return F.cross_entropy(z, labels), float((z.argmax(1) == k).float().mean()) >= 0.95

        per_class.append(invert(to_class, x, args.steps))

    def collapse(xs: Tensor) -> tuple[Tensor, bool]:
        c = mean_cosine(encoder(xs) - centre)
        return -c, float(c.detach()) >= args.collapse

    row = {"encoder": name, "seed": seed, "target": target, "class_masks": per_class,
           "target_rank": sorted(per_class).index(per_class[target]) + 1, "collapse_mask": invert(collapse, x, args.steps),
           "trigger_pixels": trigger_pixels, "trigger_hits": trigger_hits, "trigger_collapse": trigger_collapse,
           "seconds": time.perf_counter() - t0}
    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if k != "class_masks"},
          [round(v, 1) for v in per_class], flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", action="append", required=True, help="NAME=PATH (repeatable)")
    ap.add_argument("--trigger", required=True)
    ap.add_argument("--target", type=int, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--refs", type=int, default=64, help="reference images the masks are fitted on")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--collapse", type=float, default=0.85, help="mean centred cosine the collapse inversion must reach")
    args = ap.parse_args()
    rows = [one(*spec.split("=", 1), args.trigger, args.target, s, args)
            for spec in args.encoder for s in args.seeds]
    lines = [f"Mask inversion ({args.steps} Adam steps on {args.refs} clean references; `{args.trigger}`, target "
             f"{args.target}). Masks are L1 sizes in pixels; 'to target' is the share of the references (target class "
             "included) the probe sends to the target; 'target rank' is the target's place among the classes by "
             "smallest mask (1 = smallest).", "",
             "| encoder | seed | trigger: pixels / to target / collapse | target's mask | smallest other mask (class) "
             "| target rank | collapse mask |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        others = [(v, k) for k, v in enumerate(r["class_masks"]) if k != r["target"]]
        v, k = min(others)
        lines.append(f"| {r['encoder']} | {r['seed']} | {r['trigger_pixels']:.0f} / {r['trigger_hits']:.1%} / "
                     f"{r['trigger_collapse']:.2f} | {r['class_masks'][r['target']]:.1f} | {v:.1f} ({k}) | "
                     f"{r['target_rank']} | {r['collapse_mask']:.1f} |")
    write_result("trigger_inversion", {"args": vars(args), "rows": rows}, lines)


if __name__ == "__main__":
    main()
