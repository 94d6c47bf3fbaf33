"""Tests for the local trainers (lssfl.training.trainers): FedAvg, FedProx, SWA and make_trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lssfl.common.models import MLP, SmallCNN
from lssfl.training.lss import LSSTrainer, PaperLSSTrainer
from lssfl.training.trainers import (
    TRAINERS,
    FedAvgTrainer,
    FedProxTrainer,
    SWATrainer,
    make_trainer,
)

torch.set_num_threads(1)


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def _model(kind: str = "cnn") -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(width=8) if kind == "cnn" else MLP(hidden=16)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_fedavg_trains_deterministically() -> None:
    x, y = _data()
    a, b, c = _model(), _model(), _model()
    metrics = FedAvgTrainer(batch_size=16).train(a, x, y, seed=1)
    FedAvgTrainer(batch_size=16).train(b, x, y, seed=1)
    FedAvgTrainer(batch_size=16).train(c, x, y, seed=2)
    assert set(metrics) == {"train_loss"} and metrics["train_loss"] > 0
    assert _same_state(a, b)
    assert not _same_state(a, c)
    assert not _same_state(a, _model())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_fedprox_with_mu_zero_is_fedavg(optimizer: str) -> None:
    x, y = _data()
    a, b = _model(), _model()
    FedAvgTrainer(batch_size=16, optimizer=optimizer).train(a, x, y, seed=1)
    FedProxTrainer(batch_size=16, optimizer=optimizer, mu=0.0).train(b, x, y, seed=1)
    assert _same_state(a, b)


def test_fedprox_proximal_gradient() -> None:
    """Two SGD steps: the second differs from FedAvg's by exactly -lr * mu * (w1 - w0)."""
    x, y = _data(32)
    lr, mu, seed = 0.1, 0.5, 3
    common = dict(epochs=1, batch_size=16, optimizer="sgd", lr=lr, momentum=0.0)
    w0 = _flat(_model("mlp"))
    first = torch.randperm(32, generator=torch.Generator().manual_seed(seed))[:16]
    one = _model("mlp")  # w1: one step on the first batch
    FedAvgTrainer(**common).train(one, x[first], y[first], seed=seed)
    fedavg, fedprox = _model("mlp"), _model("mlp")
    FedAvgTrainer(**common).train(fedavg, x, y, seed=seed)
    FedProxTrainer(**common, mu=mu).train(fedprox, x, y, seed=seed)
    shift = -lr * mu * (_flat(one) - w0)
    assert shift.abs().max() > 1e-4
    torch.testing.assert_close(_flat(fedprox), _flat(fedavg) + shift, rtol=0, atol=1e-6)


def test_fedprox_stays_closer_to_the_global_model() -> None:
    x, y = _data()
    w0 = _flat(_model())
    fedavg, fedprox = _model(), _model()
    common = dict(epochs=3, batch_size=16, optimizer="sgd", lr=0.05)
    FedAvgTrainer(**common).train(fedavg, x, y, seed=1)
    FedProxTrainer(**common, mu=5.0).train(fedprox, x, y, seed=1)
    assert (_flat(fedprox) - w0).norm() < 0.9 * (_flat(fedavg) - w0).norm()


def test_swa_of_the_last_epoch_only_is_fedavg() -> None:
    x, y = _data()
    a, b = _model(), _model()
    FedAvgTrainer(epochs=3, batch_size=16).train(a, x, y, seed=1)
    SWATrainer(epochs=3, batch_size=16, swa_start=2).train(b, x, y, seed=1)
    assert _same_state(a, b)


def test_swa_averages_the_end_of_epoch_weights() -> None:
    x, y = _data()
    after_1, after_2, swa = _model(), _model(), _model()
    FedAvgTrainer(epochs=1, batch_size=16).train(after_1, x, y, seed=1)
    FedAvgTrainer(epochs=2, batch_size=16).train(after_2, x, y, seed=1)
    SWATrainer(epochs=2, batch_size=16, swa_start=0).train(swa, x, y, seed=1)
    expected = (_flat(after_1) + _flat(after_2)) / 2
    assert (_flat(after_2) - _flat(after_1)).abs().max() > 1e-4
    torch.testing.assert_close(_flat(swa), expected)
    buffers = dict(after_2.named_buffers())  # BatchNorm statistics: those of the last step
    for name, b in swa.named_buffers():
        assert torch.equal(b, buffers[name])


def test_swa_rejects_a_start_past_the_end() -> None:
    with pytest.raises(ValueError, match="swa_start"):
        SWATrainer(epochs=2, swa_start=2)


def test_registry() -> None:
    expected = {"fedavg": FedAvgTrainer, "fedprox": FedProxTrainer, "swa": SWATrainer}
    assert expected | {"lss": LSSTrainer, "lss-paper": PaperLSSTrainer} == TRAINERS


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_make_trainer_builds_every_trainer(name: str) -> None:
    trainer = make_trainer({"name": name, "batch_size": 32, "lr": 1e-3})
    assert isinstance(trainer, TRAINERS[name])
    assert trainer.batch_size == 32
    x, y = _data(16)
    model = _model("mlp")
    before = copy.deepcopy(model)
    metrics = trainer.train(model, x, y, seed=0)
    assert metrics["train_loss"] > 0
    assert not _same_state(model, before)


def test_make_trainer_passes_hyper_parameters() -> None:
    trainer = make_trainer({"name": "lss", "pool_size": 2, "diversity": "volume"})
    assert trainer == LSSTrainer(pool_size=2, diversity="volume")
    assert make_trainer({"name": "fedprox", "mu": 0.1}) == FedProxTrainer(mu=0.1)


@pytest.mark.parametrize(
    "spec,match",
    [
        (
            {"name": "fedsgd"},
            "unknown trainer 'fedsgd'; known: fedavg, fedprox, lss, lss-paper, swa",
        ),
        ({"epochs": 1}, "unknown trainer None"),
        ({"name": "fedavg", "mu": 0.1}, "trainer 'fedavg' has no parameter 'mu'"),
        ({"name": "lss", "epochs": 2}, "trainer 'lss' has no parameter 'epochs'"),
        ({"name": "lss", "affinity": "cosine"}, "affinity 'cosine'"),
        ({"name": "swa", "epochs": 1, "swa_start": 1}, "swa_start"),
        ({"name": "fedprox", "mu": -1.0}, "mu"),
    ],
)
def test_make_trainer_errors(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_trainer(spec)


def test_head_only_trains_the_head_alone_on_a_frozen_backbone() -> None:
    x, y = _data()
    model, initial = _model(), _model()
    FedAvgTrainer(epochs=2, batch_size=16, lr=1e-2, head_only=True).train(model, x, y, seed=1)
    before, after = initial.state_dict(), model.state_dict()
    head = {"head.3.weight", "head.3.bias"}
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    # the classifier moved; every other weight and BatchNorm's running statistics did not
    assert changed == head
    assert all(p.requires_grad for p in model.parameters())  # the freeze is undone
    # the same on FedProx and SWA, which share FedAvg's loop
    for trainer in (
        FedProxTrainer(epochs=2, batch_size=16, head_only=True, mu=0.1),
        SWATrainer(epochs=2, batch_size=16, head_only=True),
    ):
        m = _model()
        trainer.train(m, x, y, seed=1)
        assert {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])} == head
