"""torchvision ResNets initialised from ImageNet or a local weights file, with a new head.

The backbone comes from the weights; the classifier ``fc`` is always a fresh
``Linear(in_features, num_classes)``, initialised from torch's global RNG so that the caller's
``torch.manual_seed`` makes it reproducible (every silo and the coordinator then agree on it).

Weights are only ever read with loaders that cannot run code: safetensors, or
``torch.load(..., weights_only=True)`` for ``.pth``/``.pt`` state dicts. That includes the
ImageNet checkpoint, which torchvision itself would unpickle without that restriction.

Inputs: these weights expect images normalised with the ImageNet mean/std
(``lssfl partition --normalize imagenet`` stores silo data that way).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lssfl.common.logs import one_line

ARCHITECTURES = ("resnet18", "resnet50")
HEAD = "fc"
# Present in torchvision's own modules but absent from many saved checkpoints (older
# torchvision, other frameworks); BatchNorm treats a missing one as 0, so it is optional.
_OPTIONAL_SUFFIX = "num_batches_tracked"
# Wrappers that prefix every key; stripping a prefix shared by all keys loses nothing.
_WRAPPER_PREFIXES = ("module.", "model.")


class WeightsError(ValueError):
    """Weights that cannot be loaded; the one-line message names the file or key and the fix."""


def _architecture(name: str):  # -> (builder, ImageNet weights enum member)
    from torchvision import models

    if name == "resnet18":
        return models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1
    if name == "resnet50":
        return models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2
    raise ValueError(f"unknown pretrained architecture {name!r}; known: {', '.join(ARCHITECTURES)}")


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for ``name`` (from the torch hub cache, else downloaded)."""
    _, weights = _architecture(name)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(weights.url)
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url,
            map_location="cpu",
            progress=False,
            check_hash=True,
            weights_only=True,
        )
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; hash mismatch a Runtime
        raise WeightsError(
            f"could not fetch the ImageNet weights for {name} ({one_line(exc)}): on a machine "
            f"with internet download {weights.url} and copy {filename} into {cache} here (or set "
            "TORCH_HOME), or pass the path of a local .safetensors/.pth weights file instead"
        ) from None


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a local ``.safetensors`` file or ``.pth``/``.pt`` state dict, on the CPU.

    A ``.pth`` checkpoint that wraps the state dict under ``state_dict`` or ``model`` is
    unwrapped. Anything else raises :class:`WeightsError`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if suffix not in (".pth", ".pt"):
            raise WeightsError(f"{path}: expected a .safetensors, .pth or .pt weights file")
        # weights_only=True: plain tensors and containers only, so the file cannot run code.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as exc:  # both loaders raise several types for corrupt files
        raise WeightsError(f"{path}: unreadable weights file: {one_line(exc)}") from None
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not _all_tensors(obj):
        raise WeightsError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return dict(obj)


def _all_tensors(obj: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_wrapper(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _is_head(key: str) -> bool:
    return key.split(".", 1)[0] == HEAD


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model`` strictly, except that the head's keys are ignored.

    Every non-head key must be present with the model's shape (``num_batches_tracked`` may
    be missing) and no other key may appear; otherwise :class:`WeightsError` names the first
    bad key in the model's order.
    """
    state = _strip_wrapper(state)
    expected = {k: v for k, v in model.state_dict().items() if not _is_head(k)}
    problems: list[str] = []
    for key, ref in expected.items():
        if key not in state:
            if not key.endswith(_OPTIONAL_SUFFIX):
                problems.append(f"missing key {key!r}")
        elif tuple(state[key].shape) != tuple(ref.shape):
            problems.append(
                f"key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
            )
    problems += [f"unexpected key {k!r}" for k in state if k not in expected and not _is_head(k)]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise WeightsError(f"{source}: {problems[0]}{more}; it does not fit this model")
    body = {k: v for k, v in state.items() if not _is_head(k)}
    result = model.load_state_dict(body, strict=False)
    left = [k for k in result.missing_keys if not _is_head(k) and not k.endswith(_OPTIONAL_SUFFIX)]
    assert not left and not result.unexpected_keys, (left, result.unexpected_keys)


def pretrained_model(name: str, num_classes: int, weights: str | None) -> nn.Module:
    """A torchvision ``name`` ResNet whose head is a fresh ``Linear(in_features, num_classes)``.

    ``weights``: ``"imagenet"`` (torchvision's ImageNet-1k weights), the path of a local
    ``.safetensors``/``.pth`` file holding a state dict for this architecture (its ``fc`` keys,
    if any, are ignored), or None for a random initialisation.
    """
    builder, _ = _architecture(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    model = builder(weights=None)
    if weights is not None:
        if weights == "imagenet":
            state, source = imagenet_state_dict(name), f"ImageNet weights for {name}"
        else:
            state, source = read_state_dict(weights), str(weights)
        load_backbone(model, state, source)
    # Made last, so that its initial values follow from the caller's seed whatever the file.
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model
