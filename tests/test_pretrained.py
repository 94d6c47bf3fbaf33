"""Tests for lssfl.server.pretrained: ResNet backbones from local files, never the network."""

from __future__ import annotations

import functools
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet18

from lssfl.server.pretrained import WeightsError, pretrained_model


@functools.cache
def _random_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, value in resnet18().state_dict().items():
        if value.is_floating_point():
            value = torch.rand(value.shape, generator=gen) + 0.1  # > 0: valid running_var
        else:
            value = torch.randint(0, 1000, value.shape, generator=gen, dtype=value.dtype)
        state[key] = value
    return state


def random_state() -> dict[str, torch.Tensor]:
    """A resnet18 state dict whose every tensor (BN statistics included) is random.

    Made once per module (building it dominates these tests); callers get their own dict.
    """
    return dict(_random_state())


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "r18.safetensors"
    save_file(random_state(), str(path))
    return path


def assert_backbone_equals(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    body = [k for k in state if not k.startswith("fc.")]
    assert sorted(body) == sorted(k for k in got if not k.startswith("fc."))
    for key in body:
        assert got[key].dtype == state[key].dtype, key
        assert torch.equal(got[key], state[key]), key


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_file_loads_backbone_and_replaces_head(tmp_path: Path, suffix: str) -> None:
    state = random_state()
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = pretrained_model("resnet18", 7, str(path))
    assert_backbone_equals(model, state)
    assert isinstance(model.fc, torch.nn.Linear)
    assert model.fc.weight.shape == (7, 512) and model.fc.bias.shape == (7,)
    assert not torch.equal(model.fc.weight, state["fc.weight"][:7])
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_wrapped_checkpoint_without_head_or_counters(tmp_path: Path) -> None:
    state = random_state()
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # DataParallel prefixes, a {"state_dict": ...} wrapper and no num_batches_tracked: all
    # common in checkpoints saved elsewhere.
    wrapped = {f"module.{k}": v for k, v in body.items() if not k.endswith("num_batches_tracked")}
    torch.save({"epoch": 3, "state_dict": wrapped}, tmp_path / "ckpt.pt")
    model = pretrained_model("resnet18", 3, str(tmp_path / "ckpt.pt"))
    got = model.state_dict()
    for key, value in body.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(got[key], value), key
    assert model.fc.out_features == 3


def test_head_follows_the_callers_seed(weights_file: Path) -> None:
    heads = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        heads.append(pretrained_model("resnet18", 4, str(weights_file)).fc.weight)
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


@pytest.mark.parametrize(
    "edit,bad_key",
    [
        (lambda s: s.pop("layer2.1.bn2.running_mean"), "layer2.1.bn2.running_mean"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(1)), "extra.weight"),
        (lambda s: s.__setitem__("conv1.weight", torch.zeros(64, 1, 7, 7)), "conv1.weight"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_mismatched_file_names_the_key(tmp_path: Path, edit, bad_key: str) -> None:
    state = random_state()
    edit(state)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=f"'{bad_key}'") as err:
        pretrained_model("resnet18", 10, str(tmp_path / "bad.safetensors"))
    assert isinstance(err.value, WeightsError) and "\n" not in str(err.value)


def test_wrong_architecture_file_is_refused(weights_file: Path) -> None:
    # The first resnet50 key whose shape differs from resnet18's (1x1 bottleneck conv).
    with pytest.raises(WeightsError, match=r"'layer1.0.conv1.weight' has shape \(64, 64, 3, 3\)"):
        pretrained_model("resnet50", 10, str(weights_file))


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        pretrained_model("resnet18", 10, str(tmp_path / "none.pth"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(WeightsError, match=".safetensors, .pth or .pt"):
        pretrained_model("resnet18", 10, str(tmp_path / "w.bin"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match="unreadable"):
        pretrained_model("resnet18", 10, str(tmp_path / "corrupt.safetensors"))
    torch.save({"lr": 0.1}, tmp_path / "notes.pth")
    with pytest.raises(WeightsError, match="not a state dict"):
        pretrained_model("resnet18", 10, str(tmp_path / "notes.pth"))
    with pytest.raises(ValueError, match="unknown pretrained architecture"):
        pretrained_model("vgg16", 10, None)
    with pytest.raises(ValueError, match="num_classes"):
        pretrained_model("resnet18", 0, None)


def test_imagenet_offline_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as err:
        pretrained_model("resnet18", 10, "imagenet")
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "torch") in msg
    assert "name resolution" in msg and "local .safetensors/.pth" in msg


def test_imagenet_weights_are_loaded_safely(monkeypatch: pytest.MonkeyPatch) -> None:
    state = random_state()
    seen: dict = {}

    def fake_hub(url: str, **kwargs) -> dict[str, torch.Tensor]:
        seen.update(kwargs, url=url)
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_hub)
    model = pretrained_model("resnet18", 5, "imagenet")
    assert_backbone_equals(model, state)
    assert model.fc.out_features == 5
    assert seen["weights_only"] is True and seen["check_hash"] is True
    assert seen["url"].endswith("resnet18-f37072fd.pth")


def test_resnet50_random_init_head() -> None:
    model = pretrained_model("resnet50", 12, None)
    assert model.fc.in_features == 2048 and model.fc.out_features == 12


def test_coordinator_builds_the_initial_model_from_a_local_weights_file(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    from lssfl.common.config import parse_config
    from lssfl.server.initial import initial_state

    torch.manual_seed(1)
    source = resnet18(num_classes=1000).state_dict()
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    cfg = parse_config({
        "silos": ["a"], "data": {"kind": "folders"},
        "model": {"name": "resnet18", "kwargs": {"num_classes": 7}, "init": "pretrained",
                  "weights": str(path)},
    })  # fmt: skip
    state = initial_state(cfg, None)
    assert state["fc.weight"].shape == (7, 512)
    for name, value in source.items():
        if not name.startswith("fc."):
            assert torch.equal(state[name], value), name
