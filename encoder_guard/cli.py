"""The ``encoder-guard`` command: a thin layer over the library.

Every command writes ``RUN/config.yaml`` and ``RUN/log.txt``, and exits non-zero with a one-line
reason on bad input (see DESIGN.md, "CLI contract").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from encoder_guard.errors import EncoderGuardError
from encoder_guard.registry import Registry

COMMANDS: Registry[Callable[[argparse.Namespace], int]] = Registry("command")


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", required=True, help="checkpoint: ours (.safetensors), BadEncoder, solo-learn, lightly, torchvision")
    p.add_argument("--format", default="auto", help="checkpoint format (default: detect)")


def _load_encoder(args: argparse.Namespace):
    from encoder_guard.encoders import load_encoder

    return load_encoder(args.encoder, format=args.format)


# ----------------------------------------------------------------------------------------------- pretrain


def _run_config(args: argparse.Namespace, family: str, preset: str) -> dict[str, Any]:
    """The config of a run: on ``--resume`` without overrides, the run's own ``config.yaml``."""
    from encoder_guard.config import load_config, load_yaml

    saved = Path(args.out) / "config.yaml"
    if args.resume and saved.is_file() and not args.set:
        return load_yaml(saved)
    return load_config(preset, family, args.set)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pretrain import pretrain

    cfg = _run_config(args, "pretrain", args.config)
    summary = pretrain(cfg, args.out, resume=args.resume)
    print(f"encoder: {Path(args.out) / 'encoder.safetensors'}  final loss {summary['final_loss']:.4f}")
    return 0


# ----------------------------------------------------------------------------------------------- evaluate


def evaluate_config(args: argparse.Namespace) -> dict[str, Any]:
    from encoder_guard.config import apply_overrides

    base = {"encoder": str(args.encoder), "format": args.format, "dataset": args.dataset, "data_root": args.data_root,
            "train_split": "train", "test_split": "test", "train_fraction": None, "train_count": None,
            "knn_k": 200, "knn_temperature": 0.1, "probe_weight_decay": 1e-4, "seed": 0, "cache": True,
            "device": "cpu"}
    return apply_overrides(base, args.set)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from downstream import EvalConfig, evaluate_encoder
    from encoder_guard.adapt import adapt_dataset
    from encoder_guard.data import load_dataset, take_subset
    from encoder_guard.runs import RunDir

    cfg = evaluate_config(args)
    run = RunDir(args.out, cfg)
    enc = _load_encoder(args)
    train = load_dataset(cfg["dataset"], cfg["train_split"], cfg["data_root"])
    test = load_dataset(cfg["dataset"], cfg["test_split"], cfg["data_root"])
    if cfg["train_fraction"] is not None or cfg["train_count"] is not None:
        train = take_subset(train, cfg["train_fraction"], cfg["train_count"], True, int(cfg["seed"]))
    train, notes = adapt_dataset(train, enc.spec)
    test, _ = adapt_dataset(test, enc.spec)
    if notes:
        run.logger.info(f"adapted {cfg['dataset']} to the encoder: {', '.join(notes)}")
    ecfg = EvalConfig(knn_k=int(cfg["knn_k"]), knn_temperature=float(cfg["knn_temperature"]),
                      probe_weight_decay=float(cfg["probe_weight_decay"]), seed=int(cfg["seed"]), cache=bool(cfg["cache"]),
                      device=str(cfg["device"]))
    trigger = None
    if args.trigger:
        from encoder_guard.triggers import load_trigger

        if args.target is None:
            raise EncoderGuardError("--trigger needs --target K (the attack's target class)")
        if not 0 <= args.target < test.num_classes:
            raise EncoderGuardError(f"--target {args.target} is not a class of {cfg['dataset']} (0..{test.num_classes - 1})")
        trigger = load_trigger(args.trigger)
    kw = dict(trigger=trigger, trigger_key=trigger.key() if trigger else None, target=args.target)
    metrics = evaluate_encoder(enc, train, test, ecfg, **kw)
    metrics.update(encoder=str(args.encoder), adapted=notes, trigger=str(args.trigger) if args.trigger else None)
    summary = f"CA linear {metrics['ca_linear']:.2%}  CA kNN {metrics['ca_knn']:.2%}"
    if trigger is not None:
        summary += f"  ASR linear {metrics['asr_linear']:.2%}  ASR kNN {metrics['asr_knn']:.2%}"
    if args.reference_encoder:
        from encoder_guard.encoders import load_encoder

        ref = load_encoder(args.reference_encoder)
        ref_metrics = evaluate_encoder(ref, adapt_dataset(train, ref.spec)[0], adapt_dataset(test, ref.spec)[0], ecfg, **kw)
        metrics["reference"] = {k: v for k, v in ref_metrics.items() if k.startswith(("ca_", "asr_", "ra_"))}
        metrics["reference"]["encoder"] = str(args.reference_encoder)
        if trigger is not None:
            summary += f"  (reference encoder: ASR linear {ref_metrics['asr_linear']:.2%}, kNN {ref_metrics['asr_knn']:.2%})"
    run.write_json("metrics.json", metrics)
    run.logger.info(f"{summary}  → {run.file('metrics.json')}")
    return 0


# ----------------------------------------------------------------------------------------------- attack


def cmd_attack(args: argparse.Namespace) -> int:
    from encoder_guard.attacks import ATTACKS
    from encoder_guard.attacks.runner import run_attack

    ATTACKS.get(args.name)
    out = Path(args.out)
    cfg = _run_config(args, "attack", args.config or f"{args.name}-fmnist")
    report = run_attack(args.name, cfg, _load_encoder(args), out, resume=args.resume)
    print(f"backdoored encoder: {out / 'encoder.safetensors'}  trigger: {out / 'trigger.safetensors'}  "
          f"wall time {report['wall_seconds']:.0f} s")
    return 0


# ----------------------------------------------------------------------------------------------- defend


def cmd_defend(args: argparse.Namespace) -> int:
    from encoder_guard.defenses import DEFENSES
    from encoder_guard.defenses.runner import run_defense

    DEFENSES.get(args.name)
    out = Path(args.out)
    cfg = _run_config(args, "defend", args.config or args.name)
    report = run_defense(args.name, cfg, _load_encoder(args), out, resume=args.resume)
    print(f"defended encoder: {out / 'encoder.safetensors'}  report: {out / 'report.json'}  "
          f"wall time {report['wall_seconds']:.0f} s")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    """TAC's target test on a downstream classifier: encoder + head (or a probe fitted on the dataset)."""
    from encoder_guard.defenses.downstream import deployed_classifier, downstream_setup
    from encoder_guard.defenses.tac import detect
    from downstream.features import cached_features
    from encoder_guard.runs import RunDir

    cfg = {"seed": args.seed, "downstream": {"dataset": args.dataset, "root": args.data_root, "head": args.head,
                                              "clean_fraction": args.clean_fraction, "allow_more": True},
           "detect": {"encoder": str(args.encoder), "alpha": args.alpha, "margin": args.margin}}
    run = RunDir(args.out, cfg)
    enc = _load_encoder(args)
    ds = downstream_setup(cfg, enc, args.seed)
    clf = deployed_classifier(cfg, enc, ds, args.seed)
    found, _ = detect(clf, cached_features(enc, ds.data.clean), args.margin, args.alpha)
    result = {"encoder": str(args.encoder), "head": args.head, "reference_images": len(ds.data.clean), **found.as_dict()}
    run.write_json("detection.json", result)
    classes = ds.test.classes or [str(i) for i in range(len(found.norms))]
    for k, n in enumerate(found.norms):
        mark = "  ← smallest" if k == found.candidate else ""
        print(f"  {k:>2} {classes[k][:20]:<20} ‖s‖ = {n:.4f}{mark}")
    verdict = (f"BACKDOOR suspected: target class {found.candidate} ({classes[found.candidate]})" if found.flagged
               else "no class stands out (the test reads the head: a backdoor inside the encoder under a clean head "
                    "passes it; README, TAC)")
    run.logger.info(f"{verdict}; p = {found.p_value:.3g} at alpha {args.alpha} → {run.file('detection.json')}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from encoder_guard.compare import load_matrix, run_matrix

    _, paths = run_matrix(load_matrix(args.matrix), Path(args.out))
    print(paths["markdown"].read_text())
    return 0


# ----------------------------------------------------------------------------------------------- analyze


def cmd_analyze_mi(args: argparse.Namespace) -> int:
    from encoder_guard.analysis import mi_report

    rows = mi_report(_load_encoder(args), args.dataset, args.data_root, args.samples, args.estimator, args.pool,
                     args.seed, Path(args.out), args.set)
    width = max(len(r["tap"]) for r in rows)
    print(f"{'tap':<{width}}  {'shape':>12}  {'inputs':>6}  {'MI (nats)':>9}  {'weight':>6}  {'seconds':>7}")
    for r in rows:
        shape = f"{r['channels']}x{r['spatial']}x{r['spatial']}"
        print(f"{r['tap']:<{width}}  {shape:>12}  {r['inputs']:>6}  {r['mi']:>9.3f}  {r['weight']:>6.2f}  {r['seconds']:>7.1f}")
    print(f"table: {Path(args.out) / 'mi.json'}  plot: {Path(args.out) / 'mi.png'}")
    return 0


# ----------------------------------------------------------------------------------------------- trigger


def cmd_trigger_show(args: argparse.Namespace) -> int:
    from encoder_guard.triggers import load_trigger
    from encoder_guard.triggers.show import trigger_picture

    trigger = load_trigger(args.file)
    path = trigger_picture(trigger, Path(args.out), args.dataset, args.data_root, args.count)
    print(f"{trigger!r} → {path}")
    return 0


def cmd_trigger_make(args: argparse.Namespace) -> int:
    from encoder_guard.config import apply_overrides
    from encoder_guard.triggers import save_trigger
    from encoder_guard.triggers.factory import TRIGGER_KEYS, build_trigger

    cfg = apply_overrides(TRIGGER_KEYS, args.set)
    trigger = build_trigger(cfg, args.image_size, args.channels)
    path = save_trigger(trigger, Path(args.out))
    print(f"{trigger!r} → {path}")
    return 0


# ----------------------------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> int:
    enc = _load_encoder(args)
    spec = json.loads(enc.spec.to_json())
    spec["parameters"] = sum(p.numel() for p in enc.parameters())
    spec["digest"] = enc.digest()
    spec["taps"] = [{k: v for k, v in t.items()} for t in enc.feature_info]
    if args.json:
        print(json.dumps(spec, indent=2))
        return 0
    width = max(len(k) for k in spec)
    for k, v in spec.items():
        if k == "taps":
            v = ", ".join(f"{t['name']}:{t['num_chs']}ch/{t['reduction']:g}x" for t in v)
        print(f"{k:<{width}}  {v}")
    return 0


# ----------------------------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from encoder_guard.demo import run_demo

    return run_demo(Path(args.out), epochs=args.epochs, resume=args.resume)


# ----------------------------------------------------------------------------------------------- parser


def _add_method_parser(sub: Any, command: str, help_: str, name_help: str, default_config: str,
                       func: Callable[[argparse.Namespace], int]) -> None:
    """``encoder-guard attack|defend NAME --encoder CKPT [--config] [--set ...] --out RUN [--resume]``."""
    sp = sub.add_parser(command, help=help_)
    sp.add_argument("name", help=name_help)
    _add_encoder_args(sp)
    sp.add_argument("--config", default=None, help=f"preset name or YAML path (default: {default_config})")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--out", required=True)
    sp.add_argument("--resume", action="store_true")
    sp.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encoder-guard", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("pretrain", help="train a SimCLR/BYOL encoder from a preset")
    sp.add_argument("--config", required=True, help="preset name (fmnist-tiny, ...) or YAML path")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    sp.add_argument("--out", required=True, help="run directory")
    sp.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    sp.set_defaults(func=cmd_pretrain)

    sp = sub.add_parser("evaluate", help="linear probe and kNN on frozen features: CA (and ASR)")
    _add_encoder_args(sp)
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--data-root", default=None)
    sp.add_argument("--trigger", default=None, help="trigger file (ours or BadEncoder .npz): adds ASR")
    sp.add_argument("--target", type=int, default=None, help="the attack's target class")
    sp.add_argument("--reference-encoder", default=None, help="a clean encoder: the same metrics on it, for comparison")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_evaluate)

    _add_method_parser(sub, "attack", "backdoor an encoder (BadEncoder)", "attack name (badencoder)",
                       "<name>-fmnist", cmd_attack)
    _add_method_parser(sub, "defend", "defend an encoder (mimic, finetune, distill, nad, purifier, purifier-plus)",
                       "defense name", "configs/defend/<name>.yaml", cmd_defend)

    sp = sub.add_parser("analyze", help="diagnostics of an encoder")
    asub = sp.add_subparsers(dest="analyze_command", required=True)
    ap = asub.add_parser("mi", help="per-stage mutual information with the final features (table + bar plot)")
    _add_encoder_args(ap)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--samples", type=int, default=2000, help="clean images drawn from the training split")
    ap.add_argument("--estimator", default="mine", help="mine | infonce | gaussian")
    ap.add_argument("--pool", type=int, default=2, help="each stage map is average-pooled to pool x pool cells")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="estimator argument, e.g. steps=1000")
    ap.add_argument("--out", required=True)
    ap.set_defaults(func=cmd_analyze_mi)

    sp = sub.add_parser("trigger", help="make or look at a trigger")
    tsub = sp.add_subparsers(dest="trigger_command", required=True)
    tp = tsub.add_parser("show", help="write a picture of clean vs triggered samples")
    tp.add_argument("file")
    tp.add_argument("--out", required=True, help="PNG path")
    tp.add_argument("--dataset", default=None, help="samples from this dataset (default: by the trigger's channels)")
    tp.add_argument("--data-root", default=None)
    tp.add_argument("--count", type=int, default=6)
    tp.set_defaults(func=cmd_trigger_show)
    tp = tsub.add_parser("make", help="write a trigger file (the keys of an attack preset's trigger section)")
    tp.add_argument("--image-size", type=int, required=True, help="side of the (square) images, e.g. 28")
    tp.add_argument("--channels", type=int, required=True, help="1 for grayscale, 3 for colour")
    tp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="kind=patch|blend|ctrl, size, position, pattern, seed, alpha, magnitude, window, frequencies")
    tp.add_argument("--out", required=True, help="trigger file (.safetensors)")
    tp.set_defaults(func=cmd_trigger_make)

    sp = sub.add_parser("detect", help="TAC target test: is there a class every input is a small shift away from?")
    _add_encoder_args(sp)
    sp.add_argument("--head", default=None, help="the deployed head.safetensors (default: fit a linear probe on --dataset)")
    sp.add_argument("--dataset", default="fashion-mnist")
    sp.add_argument("--data-root", default=None)
    sp.add_argument("--clean-fraction", type=float, default=0.05, help="clean reference share of the training split")
    sp.add_argument("--alpha", type=float, default=0.05, help="level of the test")
    sp.add_argument("--margin", type=float, default=0.0)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_detect)

    sp = sub.add_parser("compare", help="attacks x defenses x seeds from one YAML: Markdown/CSV table and plot")
    sp.add_argument("matrix", help="matrix YAML (see configs/compare/)")
    sp.add_argument("--out", required=True, help="report directory (finished cells in it are reused)")
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("info", help="show a checkpoint's spec")
    sp.add_argument("encoder")
    sp.add_argument("--format", default="auto")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("demo", help="the whole loop on Fashion-MNIST, with a short schedule")
    sp.add_argument("--out", default="runs/demo")
    sp.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: the demo's short schedule)")
    sp.add_argument("--resume", action="store_true")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EncoderGuardError as exc:
        print(f"encoder-guard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("encoder-guard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
