"""kNN evaluation: faiss exact inner-product search vs scikit-learn brute-force cosine, same features.

Both feed the same weighted vote (k=200, T=0.1); reports each one's time, the ratio and the share of
identical predictions. Features: clustered Gaussians of the given size (default 60k×512 bank, 10k
queries, the sizes of Fashion-MNIST's two splits), or an encoder's real Fashion-MNIST features with --encoder.

Usage: python benchmarks/knn_faiss_vs_sklearn.py [--n 60000 --q 10000 --d 512] [--encoder runs/clean/encoder.safetensors]
Writes benchmarks/results/knn_faiss_vs_sklearn.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

from downstream.knn import knn_predict


def sklearn_knn_predict(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, n_cls: int, k: int, t: float) -> torch.Tensor:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute", n_jobs=-1).fit(train.numpy())
    dist, idx = nn.kneighbors(test.numpy())
    sims = torch.from_numpy(1 - dist).float()
    votes = torch.zeros(len(test), n_cls)
    votes.scatter_add_(1, labels[torch.from_numpy(idx)], (sims / t).exp())
    return votes.argmax(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--q", type=int, default=10000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--t", type=float, default=0.1)
    ap.add_argument("--encoder", default=None, help="use this encoder's Fashion-MNIST features instead")
    args = ap.parse_args()
    if args.encoder:
        from downstream.features import cached_features
        from encoder_guard.data import load_dataset
        from encoder_guard.encoders import load_encoder

        enc = load_encoder(args.encoder)
        tr, te = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
        train, test, labels = cached_features(enc, tr), cached_features(enc, te), tr.labels
        source = f"encoder {args.encoder} on Fashion-MNIST"
    else:
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(args.classes, args.d, generator=g)
        labels = torch.randint(0, args.classes, (args.n,), generator=g)
        train = centers[labels] + 2.0 * torch.randn(args.n, args.d, generator=g)
        ql = torch.randint(0, args.classes, (args.q,), generator=g)
        test = centers[ql] + 2.0 * torch.randn(args.q, args.d, generator=g)
        source = "clustered Gaussians"
    t0 = time.perf_counter()
    p_faiss = knn_predict(train, labels, test, args.classes, args.k, args.t)
    t_faiss = time.perf_counter() - t0
    t0 = time.perf_counter()
    p_sk = sklearn_knn_predict(F.normalize(train, dim=1), labels, F.normalize(test, dim=1), args.classes, args.k, args.t)
    t_sk = time.perf_counter() - t0
    same = float((p_faiss == p_sk).float().mean())
    data = {"source": source, "bank": list(train.shape), "queries": len(test), "k": args.k, "temperature": args.t,
            "faiss_seconds": t_faiss, "sklearn_seconds": t_sk, "speedup": t_sk / t_faiss, "identical_predictions": same}
    lines = [
        f"## kNN: faiss vs scikit-learn ({source}, bank {train.shape[0]}×{train.shape[1]}, {len(test)} queries, k={args.k})",
        "| backend | seconds |", "|---|---|",
        f"| faiss IndexFlatIP | {t_faiss:.2f} |", f"| scikit-learn brute cosine | {t_sk:.2f} |",
        f"speed-up {t_sk / t_faiss:.1f}×, identical predictions {same:.2%}",
    ]
    write_result("knn_faiss_vs_sklearn", data, lines)


if __name__ == "__main__":
    main()
