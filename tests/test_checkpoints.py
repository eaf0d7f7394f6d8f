"""Checkpoints from other projects load through ``load_encoder`` and give the original model's features.

Each reference model is built here the way its project builds it (from torchvision modules, not their
code), saved in that project's layout, loaded with format auto-detection, and compared feature for
feature: ``encoder(x)`` on ``x`` in ``[0, 1]`` against ``reference((x - mean) / std)`` with the
normalisation the importer chose (asserted to be the project's convention). BatchNorm statistics and
affine parameters are randomised before saving, so a swapped or misplaced norm layer would show.
Bad input must raise :class:`CheckpointError` naming the problem, without executing pickled code.
"""

from __future__ import annotations

import argparse
import json
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from encoder_guard.encoders import Encoder, load_encoder, make_spec, save_encoder
from encoder_guard.encoders.checkpoint import SPEC_KEY
from encoder_guard.encoders.spec import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from encoder_guard.errors import CheckpointError, EncoderGuardError

SOLO_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
SOLO_CIFAR_STD = (0.2470, 0.2435, 0.2616)
ATOL = 1e-5


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batches of two small images: one thread is many times faster than two on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tv_resnet(layers=(1, 1, 1, 1), seed: int = 0) -> ResNet:
    """A torchvision ResNet (widths 64..512) with randomised BatchNorm statistics and affine parameters."""
    torch.manual_seed(seed)
    net = ResNet(BasicBlock, list(layers))
    randomise_bn(net, seed)
    return net


def randomise_bn(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.num_batches_tracked.fill_(123)


def images(size: int, n: int = 2, seed: int = 7) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def normalised(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def assert_norm(enc: Encoder, mean, std) -> None:
    assert enc.spec.mean == pytest.approx(mean, abs=1e-9)
    assert enc.spec.std == pytest.approx(std, abs=1e-9)


@torch.no_grad()
def assert_same_features(enc: Encoder, reference: nn.Module, x: torch.Tensor, mean, std) -> torch.Tensor:
    """``enc(x)`` equals ``flatten(reference((x - mean) / std))``; both in eval mode."""
    enc.eval()
    reference.eval()
    ours = enc(x)
    theirs = torch.flatten(reference(normalised(x, mean, std)), 1)
    assert ours.shape == theirs.shape == (x.shape[0], enc.feature_dim)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    return ours


@torch.no_grad()
def features(enc: Encoder, x: torch.Tensor) -> torch.Tensor:
    return enc.eval()(x)


# ------------------------------------------------------------------------------------ BadEncoder / MIMIC


class SimCLRBase(nn.Module):
    """BadEncoder's ``SimCLRBase``: resnet18 children minus ``fc`` and ``maxpool``, CIFAR 3×3 pad-1 stem, as ``f``."""

    def __init__(self, layers=(2, 2, 2, 2), seed: int = 0) -> None:
        super().__init__()
        resnet = tv_resnet(layers, seed)
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        kept = [m for name, m in resnet.named_children() if name not in ("fc", "maxpool")]
        self.f = nn.Sequential(*kept)  # 0 conv1, 1 bn1, 2 relu, 3-6 layer1-4, 7 avgpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.f(x), 1)


class SimCLR(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), seed: int = 0) -> None:
        super().__init__()
        self.f = SimCLRBase(layers, seed)
        self.g = nn.Sequential(nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                               nn.Linear(512, 128, bias=True))
        randomise_bn(self.g, seed + 1)


def save_badencoder(path: Path, layers=(2, 2, 2, 2), seed: int = 0) -> SimCLR:
    model = SimCLR(layers, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # one optimiser step on a zero loss, so the optimizer state holds momentum buffers as in a real run
    (0.0 * model.g(model.f(images(32))).sum()).backward()
    optimizer.step()
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return model.eval()


@pytest.fixture(scope="module")
def badencoder_ckpt(tmp_path_factory) -> tuple[Path, SimCLR]:
    path = tmp_path_factory.mktemp("badencoder") / "model_200.pth"
    model = save_badencoder(path)
    return path, model


def test_badencoder_checkpoint_gives_the_original_features(badencoder_ckpt):
    path, model = badencoder_ckpt
    keys = torch.load(path, weights_only=True)["state_dict"]
    assert "f.f.0.weight" in keys and "f.f.6.1.bn2.running_var" in keys and "g.0.weight" in keys

    enc = load_encoder(path)
    s = enc.spec
    assert (s.stem_kernel, s.stem_stride, s.stem_padding, s.stem_pool) == (3, 1, 1, False)
    assert (s.block, s.layers, s.widths, s.stem_width, s.in_chans) == ("basic", (2, 2, 2, 2), (64, 128, 256, 512), 64, 3)
    assert s.input_size == 32 and s.feature_dim == 512
    assert s.provenance["format"] == "badencoder" and s.ssl_method == "simclr"
    assert_norm(enc, CIFAR_MEAN, CIFAR_STD)
    x = images(32)
    ours = assert_same_features(enc, model.f, x, CIFAR_MEAN, CIFAR_STD)

    # the comparison is sharp: solo-learn's padding would give other features
    other = load_encoder(path, stem_padding=2)
    assert other.spec.stem_padding == 2
    assert (features(other, x) - ours).abs().max() > 1e-3


def test_badencoder_under_ddp_prefix_and_intermediate_taps(tmp_path):
    model = SimCLR(layers=(1, 1, 1, 1), seed=3)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "state_dict": state}, tmp_path / "ddp.pth")
    enc = load_encoder(tmp_path / "ddp.pth").eval()
    assert enc.spec.layers == (1, 1, 1, 1)
    x = images(32)
    assert_same_features(enc, model.f, x, CIFAR_MEAN, CIFAR_STD)

    # forward_intermediates: the stage maps of the original Sequential, channels as feature_info says
    seq = model.f.f.eval()
    with torch.no_grad():
        feats, maps = enc.forward_intermediates(x)
        h = seq[2](seq[1](seq[0](normalised(x, CIFAR_MEAN, CIFAR_STD))))
        expected = [h]
        for i in range(3, 7):
            h = seq[i](h)
            expected.append(h)
    info = enc.feature_info
    assert [f["name"] for f in info] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert [f["num_chs"] for f in info] == [64, 64, 128, 256, 512]
    assert [f["reduction"] for f in info] == [1, 1, 2, 4, 8]
    for m, e, f in zip(maps, expected, info):
        assert m.shape[1] == f["num_chs"]
        assert m.shape[-1] == x.shape[-1] / f["reduction"]
        torch.testing.assert_close(m, e, atol=ATOL, rtol=0)
    torch.testing.assert_close(feats, enc(x), atol=ATOL, rtol=0)


def test_imported_encoder_round_trips_through_our_format(badencoder_ckpt, tmp_path):
    path, _ = badencoder_ckpt
    enc = load_encoder(path).eval()
    out = save_encoder(enc, tmp_path / "run" / "encoder.safetensors")
    back = load_encoder(out).eval()
    assert back.spec == enc.spec  # what the import assumed, and from where, is kept through our format
    assert back.spec.provenance["format"] == "badencoder"
    assert back.spec.provenance["assumed"]["input_size"]["from"].startswith("the default for a 3×3 stem")
    x = images(32)
    torch.testing.assert_close(features(back, x), features(enc, x), atol=0, rtol=0)
    assert back.digest() == enc.digest()


# ----------------------------------------------------------------------------------------------- solo-learn


def solo_backbone(seed: int) -> ResNet:
    """solo-learn's CIFAR ResNet: 3×3 stride-1 **padding-2** stem, max-pool and fc removed."""
    net = tv_resnet(seed=seed)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net.eval()


def solo_state(prefix: str, backbone: nn.Module, momentum: nn.Module | None = None) -> dict:
    state = {prefix + k: v for k, v in backbone.state_dict().items()}
    state.update({
        "projector.0.weight": torch.randn(2048, 512), "projector.0.bias": torch.randn(2048),
        "projector.1.running_mean": torch.randn(2048), "projector.3.weight": torch.randn(256, 2048),
        "classifier.weight": torch.randn(10, 512), "classifier.bias": torch.randn(10),
    })
    if momentum is not None:  # BYOL-style momentum encoder with other weights: must not be mixed in
        state.update({"momentum_" + prefix + k: v for k, v in momentum.state_dict().items()})
    return state


def test_solo_learn_ckpt_with_args_json_reads_padding_2_and_its_normalisation(tmp_path):
    backbone = solo_backbone(seed=11)
    state = solo_state("backbone.", backbone, momentum=solo_backbone(seed=12))
    path = tmp_path / "simclr-cifar10-abc123-ep=999.ckpt"
    torch.save({"epoch": 999, "global_step": 5, "pytorch-lightning_version": "2.1.0", "state_dict": state,
                "optimizer_states": [], "lr_schedulers": []}, path)
    (tmp_path / "args.json").write_text(json.dumps({"method": "simclr", "data": {"dataset": "cifar10"}}))

    enc = load_encoder(path)
    s = enc.spec
    assert (s.stem_kernel, s.stem_stride, s.stem_padding, s.stem_pool) == (3, 1, 2, False)
    assert s.input_size == 32 and s.ssl_method == "simclr"
    assert s.provenance["format"] == "solo-learn" and s.provenance["dataset"] == "cifar10"
    assert_norm(enc, SOLO_CIFAR_MEAN, SOLO_CIFAR_STD)
    x = images(32)
    ours = assert_same_features(enc, backbone, x, SOLO_CIFAR_MEAN, SOLO_CIFAR_STD)

    # BadEncoder's padding 1 on the same weights would not reproduce them
    assert (features(load_encoder(path, stem_padding=1), x) - ours).abs().max() > 1e-3


def test_older_solo_learn_encoder_prefix(tmp_path):
    backbone = solo_backbone(seed=21)
    path = tmp_path / "byol-cifar100.ckpt"
    torch.save({"epoch": 10, "state_dict": solo_state("encoder.", backbone)}, path)
    (tmp_path / "args.json").write_text(json.dumps({"method": "byol", "dataset": "cifar100"}))
    enc = load_encoder(path)
    assert enc.spec.provenance["format"] == "solo-learn" and enc.spec.ssl_method == "byol"
    assert enc.spec.stem_padding == 2 and not enc.spec.stem_pool
    assert_norm(enc, SOLO_CIFAR_MEAN, SOLO_CIFAR_STD)
    assert_same_features(enc, backbone, images(32), SOLO_CIFAR_MEAN, SOLO_CIFAR_STD)


def test_solo_learn_args_json_that_is_not_json_is_reported(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": solo_state("backbone.", solo_backbone(seed=1))}, path)
    (tmp_path / "args.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="args.json.*not valid JSON"):
        load_encoder(path)


# ----------------------------------------------------------------------------------------------- lightly


def test_lightly_tutorial_sequential_backbone_keeps_the_imagenet_stem(tmp_path):
    resnet = tv_resnet(seed=31)
    backbone = nn.Sequential(*list(resnet.children())[:-1]).eval()  # 0 conv1 1 bn1 2 relu 3 maxpool 4-7 layers 8 avgpool
    head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    state = {"backbone." + k: v for k, v in backbone.state_dict().items()}
    state.update({"projection_head.layers." + k: v for k, v in head.state_dict().items()})
    assert "backbone.0.weight" in state and "backbone.4.0.conv1.weight" in state and "backbone.7.0.bn2.bias" in state
    path = tmp_path / "epoch=99-step=100.ckpt"
    torch.save({"epoch": 99, "global_step": 100, "state_dict": state}, path)

    enc = load_encoder(path)
    s = enc.spec
    assert s.provenance["format"] == "lightly"
    assert (s.stem_kernel, s.stem_stride, s.stem_padding, s.stem_pool) == (7, 2, 3, True)
    assert_norm(enc, IMAGENET_MEAN, IMAGENET_STD)
    x = images(64)
    assert_same_features(enc, backbone, x, IMAGENET_MEAN, IMAGENET_STD)

    # forward_intermediates on the 7×7 stem: stem tap before the max-pool, channels as feature_info says
    with torch.no_grad():
        _, maps = enc.eval().forward_intermediates(x, indices=["stem", "layer1", 4])
        stem = backbone[2](backbone[1](backbone[0](normalised(x, IMAGENET_MEAN, IMAGENET_STD))))
    info = enc.feature_info
    assert [f["num_chs"] for f in info] == [64, 64, 128, 256, 512]
    assert [f["reduction"] for f in info] == [2, 4, 8, 16, 32]
    assert [m.shape[1] for m in maps] == [info[0]["num_chs"], info[1]["num_chs"], info[4]["num_chs"]]
    assert [x.shape[-1] / m.shape[-1] for m in maps] == [2, 4, 32]
    torch.testing.assert_close(maps[0], stem, atol=ATOL, rtol=0)


def test_lightly_named_backbone_with_projection_head(tmp_path):
    resnet = tv_resnet(seed=41)
    resnet.fc = nn.Identity()
    state = {"backbone." + k: v for k, v in resnet.state_dict().items()}
    state.update({"projection_head.layers.0.weight": torch.randn(512, 512), "projection_head.layers.2.weight": torch.randn(128, 512)})
    path = tmp_path / "lightly.ckpt"
    torch.save({"state_dict": state}, path)
    enc = load_encoder(path)
    assert enc.spec.provenance["format"] == "lightly"
    assert enc.spec.stem_pool and enc.spec.stem_padding == 3
    assert_norm(enc, IMAGENET_MEAN, IMAGENET_STD)
    assert_same_features(enc, resnet, images(64), IMAGENET_MEAN, IMAGENET_STD)


def test_lightly_resnetgenerator_sequential_without_stem_relu_is_refused(tmp_path):
    """lightly's own ``ResNetGenerator`` applies the stem ReLU functionally, so ``nn.Sequential(*children()[:-1])``
    has none between ``bn1`` and ``layer1`` (indices 0 conv1, 1 bn1, 2-5 layers). Our encoder always has
    that ReLU: loading must not silently give other features."""
    resnet = tv_resnet(seed=51)
    resnet.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    backbone = nn.Sequential(resnet.conv1, resnet.bn1, resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
    state = {"backbone." + k.replace(".downsample.", ".shortcut."): v for k, v in backbone.state_dict().items()}
    state["projection_head.layers.0.weight"] = torch.randn(512, 512)
    path = tmp_path / "lightly-generator.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match="no ReLU between bn1 and layer1"):
        load_encoder(path)


# ----------------------------------------------------------------------------------------- plain state dicts


def test_plain_torchvision_state_dict_ddp_prefix_and_safetensors(tmp_path):
    resnet = tv_resnet(seed=61)
    x = images(64)
    sd = resnet.state_dict()
    torch.save(sd, tmp_path / "resnet18.pth")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "resnet18.safetensors"))
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    resnet.fc = nn.Identity()
    for name in ("resnet18.pth", "ddp.pth", "resnet18.safetensors", "legacy.pt"):
        enc = load_encoder(tmp_path / name)
        s = enc.spec
        assert s.provenance["format"] == "torchvision", name
        assert (s.stem_kernel, s.stem_stride, s.stem_padding, s.stem_pool, s.input_size) == (7, 2, 3, True, 224)
        assert_norm(enc, IMAGENET_MEAN, IMAGENET_STD)
        assert_same_features(enc, resnet, x, IMAGENET_MEAN, IMAGENET_STD)


def test_plain_cifar_style_state_dict_is_read_as_cifar(tmp_path):
    resnet = tv_resnet(seed=71)
    resnet.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    resnet.maxpool = nn.Identity()
    torch.save(resnet.state_dict(), tmp_path / "cifar.pth")
    resnet.fc = nn.Identity()
    enc = load_encoder(tmp_path / "cifar.pth")
    assert (enc.spec.stem_padding, enc.spec.stem_pool, enc.spec.input_size) == (1, False, 32)
    assert_norm(enc, CIFAR_MEAN, CIFAR_STD)
    assert_same_features(enc, resnet, images(32), CIFAR_MEAN, CIFAR_STD)


# ----------------------------------------------------------------------------------------------- own format


def test_own_format_round_trip_and_overrides(tmp_path):
    torch.manual_seed(0)
    enc = Encoder(make_spec("resnet10-tiny"))
    randomise_bn(enc, 5)
    path = save_encoder(enc, tmp_path / "encoder.safetensors")
    x = torch.rand(2, 1, 28, 28)

    back = load_encoder(path)
    assert same_spec(back.spec, enc.spec)
    assert {a["from"] for a in back.spec.provenance["assumed"].values()} == {"the checkpoint's spec"}
    torch.testing.assert_close(features(back, x), features(enc, x), atol=0, rtol=0)
    assert same_spec(load_encoder(tmp_path).spec, enc.spec)  # a run folder holding encoder.safetensors

    padded = load_encoder(path, stem_padding=2)
    assert padded.spec.stem_padding == 2 and padded.backbone.conv1.padding == (2, 2)
    assert padded.spec.provenance["assumed"]["stem_padding"] == {"value": 2, "from": "given when loading"}
    assert same_spec(replace(padded.spec, stem_padding=enc.spec.stem_padding), enc.spec)
    assert (features(padded, x) - features(enc, x)).abs().max() > 1e-4
    assert same_spec(load_encoder(path, stem_padding=None).spec, enc.spec)  # None overrides are ignored


def same_spec(a, b) -> bool:
    """Equal specs, but for the record of where the loader took its assumptions from."""
    strip = lambda s: replace(s, provenance={k: v for k, v in s.provenance.items() if k != "assumed"})  # noqa: E731
    return strip(a) == strip(b)


# ----------------------------------------------------------------------------------------------- errors


def _make_marker(path: str) -> None:
    Path(path).write_text("code ran")


class Trap:
    """Unpickling this would create a file: proof that a loader executed pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_make_marker, (self.marker,))


def test_missing_empty_text_and_truncated_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_encoder(tmp_path / "nope.pth")

    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_encoder(tmp_path / "empty.pth")

    (tmp_path / "notes.txt").write_text("these are my notes about the encoder, not weights\n")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_encoder(tmp_path / "notes.txt")

    with pytest.raises(CheckpointError, match="folder"):
        load_encoder(tmp_path)

    sd = tv_resnet(layers=(1, 1, 1, 1), seed=1).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    for name in ("cut.safetensors", "cut.bin"):  # by suffix, and by content
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_encoder(tmp_path / name)

    torch.save(sd, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_encoder(tmp_path / "cut.pth")


def test_pickles_needing_code_are_refused_without_running_it(tmp_path):
    sd = tv_resnet(layers=(1, 1, 1, 1), seed=2).state_dict()
    marker = tmp_path / "marker"

    torch.save({"state_dict": sd, "obj": Trap(marker)}, tmp_path / "trap.pth")
    torch.save({"state_dict": sd, "obj": Trap(marker)}, tmp_path / "trap_legacy.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "trap.pkl").write_bytes(pickle.dumps({"state_dict": sd, "obj": Trap(marker)}, protocol=2))
    for name in ("trap.pth", "trap_legacy.pth", "trap.pkl"):
        with pytest.raises(CheckpointError, match="cannot be loaded safely") as err:
            load_encoder(tmp_path / name)
        if name != "trap.pkl":  # a raw pickle trips first on how it stores tensors
            assert "_make_marker" in str(err.value), name
        assert not marker.exists(), f"{name}: loading executed pickled code"

    # the trap is armed: the call an unrestricted unpickler would make does create the marker
    armed = tmp_path / "armed"
    fn, args = Trap(armed).__reduce__()
    fn(*args)
    assert armed.exists()

    # a training script's argparse.Namespace inside the checkpoint needs a global too
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1, arch="resnet18")}, tmp_path / "ns.pth")
    with pytest.raises(CheckpointError, match="cannot be loaded safely.*argparse.Namespace"):
        load_encoder(tmp_path / "ns.pth")


def test_weights_that_do_not_fit_name_keys_and_shapes(tmp_path, badencoder_ckpt):
    # our own file whose spec was edited: the last stage's widths no longer fit the tensors
    enc = Encoder(make_spec("resnet10-tiny"))
    path = save_encoder(enc, tmp_path / "encoder.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    spec = json.loads(meta[SPEC_KEY])
    spec["widths"] = [16, 32, 64, 256]
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata={**meta, SPEC_KEY: json.dumps(spec)})
    mismatch = r"shape mismatch layer4\.0\.conv1\.weight: file \(128, 64, 3, 3\) vs model \(256, 64, 3, 3\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_encoder(tmp_path / "edited.safetensors")

    # an override that contradicts the weights
    bad_path, _ = badencoder_ckpt
    with pytest.raises(CheckpointError, match=r"conv1\.weight: file \(64, 3, 3, 3\) vs model \(64, 3, 7, 7\)"):
        load_encoder(bad_path, stem_kernel=7)

    # a forced format that does not match the file names the keys it found
    with pytest.raises(CheckpointError, match=r"no ResNet stem \(conv1\.weight\).*f\.f\.0\.weight"):
        load_encoder(bad_path, format="torchvision")
    torch.save(tv_resnet(seed=3).state_dict(), tmp_path / "tv.pth")
    with pytest.raises(CheckpointError, match=r"no BadEncoder backbone keys \(f\.f\.\*\).*conv1\.weight"):
        load_encoder(tmp_path / "tv.pth", format="badencoder")

    with pytest.raises(EncoderGuardError, match="badencoder, lightly, solo-learn, torchvision"):
        load_encoder(tmp_path / "tv.pth", format="moco")


def test_unknown_layouts_and_clip_are_explained(tmp_path):
    torch.save({"encoder_q.conv.weight": torch.randn(8, 3, 3, 3), "encoder_q.head.bias": torch.randn(8)}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"unrecognised checkpoint layout.*encoder_q\.conv\.weight.*--format.*"
                                             r"badencoder, lightly, solo-learn, torchvision"):
        load_encoder(tmp_path / "odd.pth")

    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_encoder(tmp_path / "meta.pth")

    clip = {"visual.conv1.weight": torch.randn(32, 3, 3, 3), "visual.bn1.weight": torch.randn(32),
            "visual.layer1.0.conv1.weight": torch.randn(32, 32, 1, 1), "visual.attnpool.c_proj.weight": torch.randn(8, 8)}
    torch.save({"epoch": 1, "state_dict": clip}, tmp_path / "clip.pth")
    save_file(clip, str(tmp_path / "clip.safetensors"))
    for name in ("clip.pth", "clip.safetensors"):
        with pytest.raises(CheckpointError, match="CLIP.*not supported"):
            load_encoder(tmp_path / name)
