import pytest

from encoder_guard.config import apply_overrides, load_config
from encoder_guard.errors import EncoderGuardError
from encoder_guard.registry import Registry


def test_registry_lists_choices_on_unknown_name():
    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    reg.register("b")(2)
    assert reg.get("b") == 2
    with pytest.raises(EncoderGuardError, match="unknown widget 'c'; choose one of: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="twice"):
        reg.register("a")(3)


def test_overrides_parse_yaml_values_and_refuse_typos():
    cfg = {"optim": {"lr": 0.1, "epochs": 3}, "method": {"name": "simclr"}}
    out = apply_overrides(cfg, ["optim.lr=1e-3", "optim.epochs=5", "method.temperature=0.2"])
    assert out["optim"] == {"lr": 1e-3, "epochs": 5}
    assert out["method"]["temperature"] == 0.2
    assert cfg["optim"]["lr"] == 0.1  # the input is not modified
    with pytest.raises(EncoderGuardError, match="unknown config key 'optim.lrr'.*epochs, lr"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(EncoderGuardError, match="key=value"):
        apply_overrides(cfg, ["optim.lr"])
    with pytest.raises(EncoderGuardError, match=r"--set value '\[0.1' is not valid YAML.*\[a,b\]"):
        apply_overrides(cfg, ["optim.lr=[0.1"])  # a list cut at a comma by the shell or a cell parser


def test_presets_load_by_name_and_unknown_preset_lists_them():
    cfg = load_config("fmnist-tiny", "pretrain")
    assert cfg["method"]["name"] == "simclr"
    with pytest.raises(EncoderGuardError, match="fmnist-tiny"):
        load_config("no-such-preset", "pretrain")


def test_every_defense_builds_from_its_levels_run_settings_and_rebuilds_from_its_hparams():
    """A preset is the class's defaults: the run settings hold no defense keys, and the resolved hyperparameters
    written to a run's config.yaml rebuild the same defense (what --resume does)."""
    from encoder_guard.defenses import DEFENSES
    from encoder_guard.defenses.runner import build_defense, defend_config

    for name in DEFENSES.names():
        cfg = defend_config(name)
        assert cfg["defense"] == {} and ("data" in cfg) == (DEFENSES.get(name).level == "encoder")
        defense = build_defense(name, cfg)
        assert type(defense)(**defense.hparams()).hparams() == defense.hparams()
