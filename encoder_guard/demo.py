"""``make demo``: the whole loop on Fashion-MNIST in about 15 minutes on a 2-core CPU.

1. pretrain SimCLR with the ``fmnist-tiny`` preset on a shorter schedule than the preset's (and says so):
   as many epochs, up to 6, as fit the pretraining budget at the step time measured first, and at least 2;
2. backdoor it with BadEncoder (the ``badencoder-fmnist`` preset: a white square, target class 0);
3. evaluate both with the linear probe and kNN: clean accuracy and attack success rate side by side, with
   the raw-pixel baselines as the floor an encoder must beat;
4. compare defenses with ``encoder-guard compare``, one seed, each in its own threat: MIMIC (its preset),
   Purifier+ and its ablation without importance rating against the BadEncoder encoder under a clean probe
   (linear probe and kNN); the downstream defenses (PAD-FT, D3 with its official settings, ``d3-tail`` and TAC)
   and the two yardsticks (re-fit the head, fine-tune everything on the defender's clean share) against a
   classifier whose encoder and head were fine-tuned end to end on a 5% BadNets-poisoned set.

Each stage is skipped when its results are already in the run directory, and an interrupted stage resumes,
so running the demo again continues where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from encoder_guard.runs import RunDir, log_kept

DEMO_EPOCHS = 6  # at most; fewer where a step is slow (demo_epochs)
MIN_EPOCHS = 2  # below this the encoder is too weak for BadEncoder's table to mean much
PRETRAIN_BUDGET_S = 330.0  # the pretraining stage's share of the demo's ~15 minutes
ENCODER, FINETUNE = "badencoder", "finetune-5%"  # the demo's two threats, named as its table shows them
DEFENSES: dict[str, dict[str, Any]] = {
    "mimic": {"only": [ENCODER]},  # its preset, about 3.5 minutes on 2 cores
    "purifier-plus-no-rating": {"only": [ENCODER]},
    "purifier-plus": {"only": [ENCODER]},
    "refit-head": {"only": [FINETUNE]},  # the yardsticks, then the downstream defenses
    "finetune-all": {"only": [FINETUNE]},
    "pad-ft": {"only": [FINETUNE]},
    "d3": {"only": [FINETUNE]},  # its official settings, about 2 minutes on 2 cores
    "d3-tail": {"only": [FINETUNE]},
    "tac": {"only": [FINETUNE]},
}


def demo_matrix(pre_dir: Path, atk_dir: Path) -> dict[str, Any]:
    """The demo's comparison, one seed: the backdoored encoder under a clean probe for the encoder-level
    defenses; the clean encoder fine-tuned end to end with its head on a 5% poisoned set for the downstream ones."""
    trigger = str(atk_dir / "trigger.safetensors")
    return {
        "title": "encoder-guard demo: defenses in their own threats (1 seed)",
        "seeds": [0],
        "downstream": {"dataset": "fashion-mnist", "clean_fraction": 0.05},
        "data": {"dataset": "fashion-mnist", "fraction": 0.05},
        "attacks": {
            ENCODER: {"encoder": str(atk_dir / "encoder.safetensors"), "trigger": trigger, "target": 0},
            FINETUNE: {"encoder": str(pre_dir / "encoder.safetensors"), "trigger": trigger, "target": 0,
                       "poison_rate": 0.05, "victim": "finetune"},
        },
        "defenses": DEFENSES,
    }


def demo_epochs(seconds_per_step: float, steps_per_epoch: int, budget_s: float = PRETRAIN_BUDGET_S) -> int:
    """Pretraining epochs that fit ``budget_s`` at the measured step time, within [MIN_EPOCHS, DEMO_EPOCHS]."""
    fit = int(budget_s // (seconds_per_step * steps_per_epoch))
    return max(MIN_EPOCHS, min(DEMO_EPOCHS, fit))


def _pretrain_epochs(pre_dir: Path, preset: dict[str, Any], log: Any) -> int:
    """The epochs of a pretraining run already started in ``pre_dir``, else what fits this machine (on a GPU:
    the demo's full short schedule)."""
    from encoder_guard.config import load_yaml
    from encoder_guard.utils import resolve_device
    from pretrain.timing import step_seconds
    from pretrain.trainer import load_pretrain_data

    if (pre_dir / "config.yaml").is_file():
        return int(load_yaml(pre_dir / "config.yaml")["optim"]["epochs"])
    if resolve_device(preset["train"].get("device")).type != "cpu":
        return DEMO_EPOCHS
    data = load_pretrain_data(preset)
    batch = int(preset["optim"]["batch_size"])
    seconds = step_seconds(preset, batch, steps=5, size=data.image_size, chans=data.channels)
    steps = len(data) // batch  # as the trainer counts them
    epochs = demo_epochs(seconds, steps)
    log.info(f"measured {seconds:.2f} s a pretraining step here ({steps} steps an epoch): {epochs} epochs fit the "
             f"demo's {PRETRAIN_BUDGET_S / 60:.1f}-minute pretraining budget (bounds {MIN_EPOCHS}-{DEMO_EPOCHS}; "
             "--epochs N sets it)")
    return epochs


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[title for _, title in columns]] + [[str(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def plan(preset: dict[str, Any], attack_preset: dict[str, Any], epochs: int) -> str:
    """The demo's five stages, with the schedules it runs (the attack's from its class defaults and preset)."""
    from encoder_guard.attacks.runner import build_attack

    attack = build_attack("badencoder", attack_preset).hparams()
    return (
        f"  1/5 pretrain SimCLR on Fashion-MNIST (preset fmnist-tiny, shortened for the demo to {epochs} of its "
        f"{preset['optim']['epochs']} epochs)\n"
        f"  2/5 BadEncoder on it (preset badencoder-fmnist: {attack['epochs']} epochs on "
        f"{attack_preset['shadow']['count']:,} shadow images)\n"
        "  3/5 linear probe + kNN on frozen features: CA and ASR of both encoders\n"
        "  4/5 raw-pixel baselines under the same protocol\n"
        f"  5/5 compare defenses (encoder-guard compare): {', '.join(d for d, e in DEFENSES.items() if ENCODER in e['only'])} "
        f"against the BadEncoder encoder; {', '.join(d for d, e in DEFENSES.items() if FINETUNE in e['only'])} against "
        "a classifier fine-tuned end to end on a 5% poisoned set"
    )


def _done(run: Path) -> bool:
    return (run / "encoder.safetensors").is_file() and (run / "metrics.json").is_file()


def run_demo(out: Path, epochs: int | None = None) -> int:
    from downstream import EvalConfig, evaluate_encoder
    from downstream.baselines import raw_pixel_metrics
    from encoder_guard.attacks.runner import run_attack
    from encoder_guard.config import dump_config, load_config
    from encoder_guard.data import load_dataset
    from encoder_guard.encoders import load_encoder
    from encoder_guard.triggers import load_trigger
    from pretrain import pretrain

    pre_dir, atk_dir = out / "pretrain", out / "badencoder"
    run = RunDir(out)
    log = run.logger
    preset = load_config("fmnist-tiny", "pretrain")
    epochs = epochs or _pretrain_epochs(pre_dir, preset, log)
    if run.writes:
        dump_config({"demo": {"preset": "fmnist-tiny", "epochs": epochs, "defenses": DEFENSES}}, run.file("config.yaml"))
    attack_preset = load_config("badencoder-fmnist", "attack")
    log.info(f"encoder-guard demo → {out}\n{plan(preset, attack_preset, epochs)}")
    t0 = time.perf_counter()
    if _done(pre_dir):
        log.info(f"[1/5] pretraining already done in {pre_dir}, reusing it")
    else:
        cfg = load_config("fmnist-tiny", "pretrain", [f"optim.epochs={epochs}"])
        with log_kept():
            pretrain(cfg, pre_dir, resume=(pre_dir / "checkpoints" / "last.pt").is_file())
    t_pre = time.perf_counter() - t0

    clean = load_encoder(pre_dir / "encoder.safetensors")
    if _done(atk_dir):
        log.info(f"[2/5] BadEncoder already done in {atk_dir}, reusing it")
    else:
        log.info("[2/5] BadEncoder: fine-tuning the clean encoder so that triggered images embed like class 0")
        with log_kept():
            run_attack("badencoder", load_config("badencoder-fmnist", "attack"), clean, atk_dir,
                       resume=(atk_dir / "checkpoints" / "last.pt").is_file())
    t_atk = time.perf_counter() - t0 - t_pre

    log.info("[3/5] evaluating both encoders (linear probe; kNN k=200, T=0.1) with and without the trigger")
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    trigger = load_trigger(atk_dir / "trigger.safetensors")
    target = int(attack_preset["target"])
    m_clean = evaluate_encoder(clean, train, test, EvalConfig(), trigger, trigger.key(), target)
    m_bd = evaluate_encoder(load_encoder(atk_dir / "encoder.safetensors"), train, test, EvalConfig(), trigger, trigger.key(),
                            target)
    log.info("[4/5] raw-pixel baselines")
    raw = raw_pixel_metrics(train, test)
    t_eval = time.perf_counter() - t0 - t_pre - t_atk
    log.info("[5/5] comparing defenses: the BadEncoder encoder under a clean probe, and the clean encoder fine-tuned "
             "end to end with its head on a 5% BadNets-poisoned set (cells already done in a previous run are reused)")
    from downstream.report import aggregate, markdown
    from encoder_guard.compare import run_matrix

    cmp_dir = out / "compare"
    with log_kept():
        cells, paths = run_matrix(demo_matrix(pre_dir, atk_dir), cmp_dir)
    total = time.perf_counter() - t0
    keys = ("ca_linear", "ca_knn", "asr_linear", "asr_knn")
    run.write_json("metrics.json", {"clean": {k: m_clean[k] for k in keys}, "badencoder": {k: m_bd[k] for k in keys},
                                    "raw_pixels": raw, "pretrain_epochs": epochs, "pretrain_seconds": t_pre,
                                    "attack_seconds": t_atk, "eval_seconds": t_eval,
                                    "compare_seconds": total - t_pre - t_atk - t_eval, "total_seconds": total})
    rows = [
        {"enc": f"clean SimCLR ({epochs} epochs)", **{k: pct(m_clean[k]) for k in keys}},
        {"enc": "BadEncoder (target 0, white square)", **{k: pct(m_bd[k]) for k in keys}},
        {"enc": "raw pixels (784-d)", "ca_linear": pct(raw["ca_linear"]), "ca_knn": pct(raw["ca_knn"])},
    ]
    summary = "\n".join([
        format_table(rows, [("enc", "encoder"), ("ca_linear", "CA linear"), ("ca_knn", "CA kNN"),
                            ("asr_linear", "ASR linear"), ("asr_knn", "ASR kNN")]),
        "\nFashion-MNIST test set (10,000 images; ASR over the 9,000 non-target images).",
        f"\nDefenses in their own threats ({paths['markdown']}; plot: {paths.get('plot', 'needs matplotlib')}):\n",
        markdown(aggregate(cells)),
        f"\n{ENCODER}: the backdoored encoder under a clean probe; {FINETUNE}: the clean encoder and its head fine-tuned "
        "end to end on a 5%-poisoned set (none: that victim). kNN: — where a defense returns a classifier (encoder + "
        "linear head). refit-head and finetune-all are the yardsticks: the defender's 3,000 clean images used plainly.",
        f"\nWall time {total / 60:.1f} min; everything is in {out} (these tables: {run.file('summary.md')}).",
        "The demo shortens the schedules; the full presets: encoder-guard pretrain --config fmnist-tiny --out runs/clean, "
        "then encoder-guard attack badencoder --encoder runs/clean/encoder.safetensors --out runs/badencoder",
    ])
    if run.writes:
        run.file("summary.md").write_text(summary + "\n")
    print("\n" + summary)
    return 0
