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


def test_every_defend_preset_builds_its_defense_and_names_a_registered_one():
    """A preset key the class does not take would only fail when a run reaches it (a compare cell)."""
    import inspect
    from pathlib import Path

    from encoder_guard.config import load_config
    from encoder_guard.defenses import DEFENSES

    presets = sorted(Path(__file__).resolve().parents[1].joinpath("configs", "defend").glob("*.yaml"))
    assert len(presets) >= 12
    for path in presets:
        cfg = load_config(path.stem, "defend")
        assert cfg["name"] == path.stem
        cls = DEFENSES.get(cfg["name"])
        DEFENSES.get(cfg["name"])(**(cfg.get("defense") or {}))
        # a preset states the class defaults (library and CLI behave alike)
        defaults = {k: p.default for k, p in inspect.signature(getattr(cls, "func", cls)).parameters.items()}
        defaults.update(getattr(cls, "keywords", {}))  # a registered partial (distill, nad) sets its own
        for key, value in (cfg.get("defense") or {}).items():
            default = defaults.get(key, value)  # (a key taken through **kwargs: construction checked it)
            if isinstance(default, (int, float, str, bool)) and not isinstance(value, (list, dict)):
                assert value == default, f"{path.name}: {key} = {value!r} but the class defaults to {default!r}"
