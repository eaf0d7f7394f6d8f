"""The ``encoder-guard`` command: argument parsing and printing over the library.

Every command that makes a run directory writes ``RUN/config.yaml`` and ``RUN/log.txt``, and exits with
status 2 and a one-line reason on bad input; the reason is appended to ``RUN/log.txt`` too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from encoder_guard.errors import EncoderGuardError

# ----------------------------------------------------------------------------------------------- encoders


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.5,0.5,0.5; got {text!r}") from None


def _add_encoder_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    """``--encoder`` and what a checkpoint cannot tell about the encoder's input, for every command taking one."""
    if positional:
        p.add_argument("encoder", help="checkpoint: ours (.safetensors), BadEncoder/MIMIC, solo-learn, lightly, torchvision")
    else:
        p.add_argument("--encoder", required=True,
                       help="checkpoint: ours (.safetensors), BadEncoder/MIMIC, solo-learn, lightly, torchvision")
    g = p.add_argument_group("what the checkpoint cannot tell (default: its spec, else its format's convention; "
                             "`encoder-guard info` shows which)")
    g.add_argument("--format", default="auto", help="checkpoint format (default: detect)")
    g.add_argument("--input-size", type=int, default=None, help="side of the square images the encoder was trained on")
    g.add_argument("--mean", type=_floats, default=None, help="per-channel normalisation mean, e.g. 0.4914,0.4822,0.4465")
    g.add_argument("--std", type=_floats, default=None, help="per-channel normalisation std")
    g.add_argument("--stem-stride", type=int, default=None, help="stride of the first convolution")
    g.add_argument("--stem-padding", type=int, default=None, help="padding of the first convolution")
    g.add_argument("--stem-pool", type=lambda v: v.lower() in ("1", "true", "yes"), default=None, metavar="BOOL",
                   help="whether a 3x3 stride-2 max-pool follows the stem")


def _load_encoder(args: argparse.Namespace, path: str | None = None) -> Any:
    from encoder_guard.encoders import load_encoder

    return load_encoder(path or args.encoder, format=args.format, input_size=args.input_size, mean=args.mean,
                        std=args.std, stem_stride=args.stem_stride, stem_padding=args.stem_padding,
                        stem_pool=args.stem_pool)


def _run_config(args: argparse.Namespace, family: str, preset: str | Path) -> dict[str, Any]:
    """The config of a run: on ``--resume`` without overrides, the run's own ``config.yaml``."""
    from encoder_guard.config import load_config, load_yaml

    saved = Path(args.out) / "config.yaml"
    if args.resume and saved.is_file() and not args.set:
        return load_yaml(saved)
    return load_config(preset, family, args.set)


# ----------------------------------------------------------------------------------------------- commands


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pretrain import pretrain

    summary = pretrain(_run_config(args, "pretrain", args.config), args.out, resume=args.resume)
    print(f"encoder: {Path(args.out) / 'encoder.safetensors'}  final loss {summary['final_loss']:.4f}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from downstream.evaluate import EVAL_DEFAULTS, run_evaluation
    from encoder_guard.config import apply_overrides

    cfg = apply_overrides({**EVAL_DEFAULTS, "dataset": args.dataset, "data_root": args.data_root}, args.set)
    cfg.update(encoder=str(args.encoder), trigger=args.trigger)
    trigger = None
    if args.trigger:
        from encoder_guard.triggers import load_trigger

        trigger = load_trigger(args.trigger)
    reference = _load_encoder(args, args.reference_encoder) if args.reference_encoder else None
    run_evaluation(_load_encoder(args), cfg, args.out, trigger, args.target, reference)
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from encoder_guard.attacks import ATTACKS
    from encoder_guard.attacks.runner import run_attack

    ATTACKS.get(args.name)
    cfg = _run_config(args, "attack", args.config or f"{args.name}-fmnist")
    report = run_attack(args.name, cfg, _load_encoder(args), Path(args.out), resume=args.resume)
    print(f"backdoored encoder: {Path(args.out) / 'encoder.safetensors'}  trigger: {Path(args.out) / 'trigger.safetensors'}"
          f"  wall time {report['wall_seconds_since_resume']:.0f} s")
    return 0


def cmd_defend(args: argparse.Namespace) -> int:
    from encoder_guard.defenses import DEFENSES
    from encoder_guard.defenses.runner import defend_config, run_defense

    level = DEFENSES.get(args.name).level
    saved = Path(args.out) / "config.yaml"
    if args.resume and saved.is_file() and not args.set:
        from encoder_guard.config import load_yaml

        cfg = load_yaml(saved)
    else:
        cfg = defend_config(args.name, args.config, args.set)
    report = run_defense(args.name, cfg, _load_encoder(args), Path(args.out), resume=args.resume)
    what = "classifier" if level == "classifier" else "encoder"
    print(f"defended {what}: {Path(args.out)}  report: {Path(args.out) / 'report.json'}  "
          f"wall time {report['wall_seconds_since_resume']:.0f} s")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    """TAC's target test on a downstream classifier: encoder + head (or a probe fitted on the dataset)."""
    from encoder_guard.defenses.tac import run_detection

    cfg = {"seed": args.seed, "downstream": {"dataset": args.dataset, "root": args.data_root, "head": args.head,
                                              "clean_fraction": args.clean_fraction, "allow_more": True},
           "detect": {"encoder": str(args.encoder), "alpha": args.alpha, "margin": args.margin}}
    found = run_detection(_load_encoder(args), cfg, args.out)
    for k, n in enumerate(found["norms"]):
        mark = "  ← smallest" if k == found["candidate"] else ""
        print(f"  {k:>2} {found['classes'][k][:20]:<20} ‖s‖ = {n:.4f}{mark}")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    """Is the encoder backdoored? Trigger inversion on clean unlabelled images (DECREE or SSL-Cleanse)."""
    from encoder_guard.config import apply_overrides
    from encoder_guard.scan.runner import SCAN_DEFAULTS, run_scan

    data = {**SCAN_DEFAULTS["data"], "dataset": args.dataset, "root": args.data_root, "split": args.split,
            "count": args.count}
    cfg = apply_overrides({**SCAN_DEFAULTS, "method": args.method, "seed": args.seed, "data": data,
                           "reference": args.reference, "encoder": str(args.encoder)}, args.set)
    report = run_scan(_load_encoder(args), cfg, args.out)
    target = report["suspected_target"]
    print(f"{'BACKDOOR SUSPECTED' if report['flagged'] else 'no backdoor found'}: {report['method']} score "
          f"{report['score']:.4g} ({report['rule']})"
          + (f"; nearest class to the trigger's embedding: {target['class']} ({target['name']})" if target else "")
          + f"\nreport: {Path(args.out) / 'report.json'}  trigger: {Path(args.out) / 'trigger.png'}")
    return 0


def cmd_scan_population(args: argparse.Namespace) -> int:
    from encoder_guard.scan.population import load_population_config, report, run_population

    cfg = load_population_config(args.config)
    paths = report(cfg, run_population(cfg, Path(args.out)), Path(args.out))
    print(paths["markdown"].read_text())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from encoder_guard.compare import load_matrix, run_matrix

    _, paths = run_matrix(load_matrix(args.matrix), Path(args.out))
    print(paths["markdown"].read_text())
    return 0


def cmd_heldout(args: argparse.Namespace) -> int:
    from encoder_guard.heldout import load_heldout_config, merge, parse_shard, run_heldout

    cfg, out = load_heldout_config(args.config), Path(args.out)
    shard = parse_shard(args.shard) if args.shard else (1, 1)
    if not args.merge:
        run_heldout(cfg, out, shard)
    if args.shard and not args.merge:
        print(f"shard {args.shard} finished; when every shard has: encoder-guard heldout {args.config} --out {out} --merge")
        return 0
    _, paths = merge(cfg, out)
    print(paths["markdown"].read_text())
    return 0


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

    trigger = build_trigger(apply_overrides(TRIGGER_KEYS, args.set), args.image_size, args.channels)
    print(f"{trigger!r} → {save_trigger(trigger, Path(args.out))}")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from encoder_guard.config import load_config
    from encoder_guard.zoo import FAMILIES, write_zoo, zoo

    families = tuple(args.families or FAMILIES)
    try:
        attacks = zoo(args.split, args.per_family, families, args.image_size, args.num_classes, args.start)
    except ValueError as exc:
        raise EncoderGuardError(f"zoo: {exc}") from exc
    index = write_zoo(attacks, load_config(args.base, "attack"), Path(args.out), args.image_size, args.channels,
                      pictures=not args.no_pictures)
    for a in attacks:
        print(f"{a.name:>12}  {a.split}  target {a.target}  {a.trigger}")
    print(f"{len(attacks)} attacks → {index}\nrun one: encoder-guard attack badencoder --encoder ENC "
          f"--config {Path(args.out) / attacks[0].name / 'attack.yaml'} --out runs/zoo/{attacks[0].name}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    enc = _load_encoder(args)
    spec = json.loads(enc.spec.to_json())
    assumed = spec["provenance"].pop("assumed", {})
    spec["parameters"] = sum(p.numel() for p in enc.parameters())
    spec["digest"] = enc.digest()
    spec["taps"] = list(enc.feature_info)
    if args.json:
        print(json.dumps({**spec, "assumed": assumed}, indent=2))
        return 0
    width = max(len(k) for k in spec)
    for k, v in spec.items():
        if k == "taps":
            v = ", ".join(f"{t['name']}:{t['num_chs']}ch/{t['reduction']:g}x" for t in v)
        print(f"{k:<{width}}  {v}")
    if assumed:
        print("\nwhat the weights do not say, and where it came from (change it with --input-size, --mean, ...):")
        for k, a in assumed.items():
            print(f"  {k:<{width - 2}}  {a['value']}  ({a['from']})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from encoder_guard.demo import run_demo

    return run_demo(Path(args.out), epochs=args.epochs)


# ----------------------------------------------------------------------------------------------- parser


def _defenses_epilog() -> str:
    from encoder_guard.defenses import DEFENSES

    lines = ["defenses (name, level, data it needs):"]
    for name in DEFENSES.names():
        cls = DEFENSES.get(name)
        lines.append(f"  {name:<13} {cls.level:<10} {cls.needs}")
    lines.append("\nEach runs its preset; --set defense.KEY=VALUE changes one hyperparameter (the run's config.yaml "
                 "lists them all). Run settings (data, downstream task): configs/defend/encoder.yaml and classifier.yaml.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encoder-guard", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)

    def run_args(sp: argparse.ArgumentParser, resume: bool = True) -> None:
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        sp.add_argument("--out", required=True, help="run directory")
        if resume:
            sp.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")

    sp = sub.add_parser("pretrain", help="train a SimCLR/BYOL encoder from a preset")
    sp.add_argument("--config", required=True, help="preset name (fmnist-tiny, fmnist-tiny-byol, cifar10-paper) or YAML path")
    run_args(sp)
    sp.set_defaults(func=cmd_pretrain)

    sp = sub.add_parser("evaluate", help="linear probe and kNN on frozen features: CA (and ASR)")
    _add_encoder_args(sp)
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--data-root", default=None)
    sp.add_argument("--trigger", default=None, help="trigger file (ours or BadEncoder .npz): adds ASR")
    sp.add_argument("--target", type=int, default=None, help="the attack's target class")
    sp.add_argument("--reference-encoder", default=None, help="a clean encoder: the same metrics on it, for comparison")
    run_args(sp, resume=False)
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("attack", help="backdoor an encoder (BadEncoder)")
    sp.add_argument("name", help="attack name (badencoder)")
    _add_encoder_args(sp)
    sp.add_argument("--config", default=None, help="preset name or YAML path (default: <name>-fmnist)")
    run_args(sp)
    sp.set_defaults(func=cmd_attack)

    sp = sub.add_parser("defend", help="defend an encoder or a downstream classifier (list: defend --help)",
                        epilog=_defenses_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("name", help="defense name (listed below)")
    _add_encoder_args(sp)
    sp.add_argument("--config", default=None, help="run settings YAML (default: configs/defend/<level>.yaml)")
    run_args(sp)
    sp.set_defaults(func=cmd_defend)

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
    run_args(ap, resume=False)
    ap.set_defaults(func=cmd_analyze_mi)

    sp = sub.add_parser("trigger", help="make or look at a trigger")
    tsub = sp.add_subparsers(dest="trigger_command", required=True)
    tp = tsub.add_parser("show", help="write a picture of clean vs triggered samples")
    tp.add_argument("file")
    tp.add_argument("--out", required=True, help="PNG path")
    tp.add_argument("--dataset", default=None, help="samples from this dataset (default: by the trigger's channels)")
    tp.add_argument("--data-root", default=None)
    tp.add_argument("--count", type=int, default=6)
    tp.set_defaults(func=cmd_trigger_show, file_output=True)
    tp = tsub.add_parser("make", help="write a trigger file (the keys of an attack preset's trigger section)")
    tp.add_argument("--image-size", type=int, required=True, help="side of the (square) images, e.g. 28")
    tp.add_argument("--channels", type=int, required=True, help="1 for grayscale, 3 for colour")
    tp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="kind=patch|blend|ctrl|warp, size, position, pattern, seed, alpha, magnitude, window, "
                         "frequencies, k, strength")
    tp.add_argument("--out", required=True, help="trigger file (.safetensors)")
    tp.set_defaults(func=cmd_trigger_make, file_output=True)

    sp = sub.add_parser("zoo", help="draw BadEncoder attacks from seeded trigger families (dev or test split)")
    sp.add_argument("--split", required=True, choices=["dev", "test"],
                    help="dev: seeds for choosing presets; test: seeds that are only reported")
    sp.add_argument("--per-family", type=int, default=3, help="attacks drawn from each family")
    sp.add_argument("--families", nargs="+", default=None, help="patch blend ctrl warp (default: all four)")
    sp.add_argument("--start", type=int, default=0, help="skip the split's first START seeds")
    sp.add_argument("--base", default="badencoder-fmnist", help="attack preset the drawn attacks change")
    sp.add_argument("--image-size", type=int, default=28)
    sp.add_argument("--channels", type=int, default=1)
    sp.add_argument("--num-classes", type=int, default=10)
    sp.add_argument("--no-pictures", action="store_true", help="skip trigger.png (it reads the test split's images)")
    sp.add_argument("--out", required=True, help="directory: NAME/attack.yaml, trigger.safetensors, trigger.png; zoo.yaml")
    sp.set_defaults(func=cmd_zoo, file_output=True)

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

    sp = sub.add_parser("scan", help="is this encoder backdoored? trigger inversion on clean unlabelled images")
    _add_encoder_args(sp)
    sp.add_argument("--dataset", required=True, help="clean images to scan with (labels, where present, name the target)")
    sp.add_argument("--data-root", default=None)
    sp.add_argument("--split", default="test")
    sp.add_argument("--count", type=int, default=None, help="images drawn from the split (default: all; the scanner "
                    "samples its own share, 1,000 for each method and 500 more for collapse's held-out measure)")
    sp.add_argument("--method", default="collapse", help="scanner: collapse (default), decree or ssl-cleanse")
    sp.add_argument("--reference", default=None, help="clean encoders' scores (JSON) that calibrate the verdict")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. settings.max_epochs=100 or z_threshold=2.5")
    sp.add_argument("--out", required=True, help="run directory")
    sp.set_defaults(func=cmd_scan)

    sp = sub.add_parser("scan-population", help="a scanner on clean and backdoored encoders: AUROC, TPR/FPR, reference")
    sp.add_argument("config", help="population YAML (see configs/scan/)")
    sp.add_argument("--out", required=True, help="directory of cells (finished ones are reused) and the report")
    sp.set_defaults(func=cmd_scan_population)

    sp = sub.add_parser("compare", help="attacks x defenses x seeds from one YAML: Markdown/CSV table and plot")
    sp.add_argument("matrix", help="matrix YAML (see configs/compare/)")
    sp.add_argument("--out", required=True, help="report directory (finished cells in it are reused)")
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("heldout", help="encoder-level defenses on held-out zoo attacks and another domain")
    sp.add_argument("config", help="benchmark YAML (see configs/heldout/)")
    sp.add_argument("--out", required=True, help="directory of cells (finished ones are reused) and the report")
    sp.add_argument("--shard", default=None, metavar="K/N", help="run every N-th unit from the K-th (a job array's task)")
    sp.add_argument("--merge", action="store_true", help="only write the report from the finished cells")
    sp.set_defaults(func=cmd_heldout)

    sp = sub.add_parser("info", help="show a checkpoint's spec and what was assumed about it")
    _add_encoder_args(sp, positional=True)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("demo", help="the whole loop on Fashion-MNIST, with short schedules")
    sp.add_argument("--out", default="runs/demo")
    sp.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: what fits the demo's budget)")
    sp.set_defaults(func=cmd_demo)
    return p


def _log_failure(args: argparse.Namespace, message: str) -> None:
    """Append a failed command's one-line reason to its run directory's ``log.txt``."""
    out = getattr(args, "out", None)
    if not out or getattr(args, "file_output", False):
        return
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "log.txt", "a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR {message}\n")
    except OSError:
        pass  # the run directory cannot be written either: the message on stderr is all there is


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or 0)
    except EncoderGuardError as exc:
        print(f"encoder-guard: error: {exc}", file=sys.stderr)
        _log_failure(args, str(exc))
        return 2
    except KeyboardInterrupt:
        print("encoder-guard: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroy a torchrun process group before the interpreter exits.

    Left to interpreter shutdown, gloo's worker threads can be torn down while still joinable, and the
    process aborts ("terminate called without an active exception") after its work is done.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
