"""Tests for Local Superior Soups (lssfl.training.lss): each invariant of the trainer's spec;
its pure pieces (draws, pool rows, distances) are in test_lss_math.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lssfl.common.models import MLP, SmallCNN, head_parameter_names
from lssfl.training.lss import (
    LSSTrainer,
    RoundState,
    sample_alphas,
)
from lssfl.training.lss_measures import importance_weights
from lssfl.training.trainers import FedAvgTrainer

torch.set_num_threads(1)


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(width=8) if kind == "cnn" else MLP(hidden=16)


def _flat(model: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in names])


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Recorder(LSSTrainer):
    """LSSTrainer that snapshots the pool before every step."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.log: list[dict] = []
        self.state: RoundState | None = None

    def step(self, model, state, opt, x, y, alphas, measure=False):  # type: ignore[override]
        self.state = state
        self.log.append(
            {
                "size": state.pool.size,
                "rows": state.pool.rows[: state.pool.size + 2].clone(),
                "alphas": alphas.clone(),
                "head": {n: h.detach().clone() for n, h in state.head.items()},
            }
        )
        return super().step(model, state, opt, x, y, alphas, measure)


# --- training -----------------------------------------------------------------------------------


def test_training_invariants() -> None:
    model = _model("mlp")
    x, y = _data()
    initial = copy.deepcopy(model)
    trainer = Recorder(pool_size=3, epochs_per_member=1, batch_size=16, interp_samples=2)
    trainer.train(model, x, y, seed=0)
    state = trainer.state
    assert state is not None
    final_rows = state.pool.rows
    assert torch.equal(final_rows[0], _flat(initial, state.layout.names))  # row 0 is f_p
    assert len(trainer.log) == 3 * 4
    for i, entry in enumerate(trainer.log):
        k, rows, alphas = entry["size"] + 1, entry["rows"], entry["alphas"]
        # alphas: over the k current members, non-negative, sum to 1
        assert alphas.shape[1] == k and (alphas >= 0).all()
        torch.testing.assert_close(alphas.sum(dim=1), torch.ones(len(alphas)).double())
        # frozen members never change while a later member trains
        assert torch.equal(rows[1:k], final_rows[1:k])
        first = i == 0 or trainer.log[i - 1]["size"] != entry["size"]
        if first:  # a new member starts at the pool average (member 1 at f_p)
            start = rows[0] if k == 1 else rows[1:k].mean(dim=0)
            torch.testing.assert_close(rows[k], start, rtol=0, atol=1e-7)
            assert not torch.equal(rows[k], final_rows[k])  # and then trains
    # the upload is the uniform average of the members
    result = _flat(model, state.layout.names)
    assert torch.equal(result, state.pool.average())
    torch.testing.assert_close(result, final_rows[1:].double().mean(dim=0).float())
    for member in final_rows[1:]:
        assert (result - member).abs().max() > 1e-5


@pytest.mark.parametrize(
    "affinity,diversity,rms", [("l2", "l2", False), ("sq_l2", "volume", False), ("l2", "l2", True)]
)
def test_step_matches_an_autograd_reference(affinity: str, diversity: str, rms: bool) -> None:
    """One step against the loss written out naively: soup of 3 members, 2 alpha draws."""
    model = _model("mlp")
    x, y = _data(16)
    lr, lambda_a, lambda_d = 0.1, 2.0, 1.5
    trainer = LSSTrainer(
        pool_size=3,
        optimizer="sgd",
        lr=lr,
        momentum=0.0,
        lambda_a=lambda_a,
        lambda_d=lambda_d,
        affinity=affinity,
        diversity=diversity,
        rms_distances=rms,
        interp_samples=2,
    )
    state = trainer.prepare(model, x, y)
    g = torch.Generator().manual_seed(0)
    d = state.layout.dim
    for member in range(3):
        opt = trainer.start_member(state)
        with torch.no_grad():
            state.pool.active.add_(torch.randn(d, generator=g), alpha=0.05)
        if member < 2:
            state.pool.finish_member()
    rows = state.pool.rows.clone()
    alphas = sample_alphas(3, 2, g)
    trainer.step(model, state, opt, x, y, alphas)

    f = rows[3].clone().requires_grad_()
    ce = 0.0
    for a in alphas.float():
        soup = a[0] * rows[1] + a[1] * rows[2] + a[2] * f
        params = dict(zip(state.layout.names, state.layout.views(soup), strict=True))
        ce = ce + F.cross_entropy(functional_call(model, params, (x,)), y) / len(alphas)

    def dist(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (u - v).norm() / (math.sqrt(d) if rms else 1.0)

    affinity_value = dist(f, rows[0]) if affinity == "l2" else dist(f, rows[0]) ** 2
    if diversity == "l2":
        diversity_value = (dist(f, rows[1]) + dist(f, rows[2])) / 2
    else:  # area of the triangle of the three members (Heron)
        a, b, c = dist(f, rows[1]), dist(f, rows[2]), dist(rows[1], rows[2])
        s = (a + b + c) / 2
        diversity_value = (s * (s - a) * (s - b) * (s - c)).sqrt()
    (ce + lambda_a * affinity_value - lambda_d * diversity_value).backward()
    torch.testing.assert_close(state.pool.active, rows[3] - lr * f.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(state.pool.rows[:3], rows[:3])


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_one_member_without_regulariser_is_fedavg(kind: str, optimizer: str) -> None:
    x, y = _data()
    a, b = _model(kind), _model(kind)
    common = dict(batch_size=16, lr=1e-2, optimizer=optimizer)
    FedAvgTrainer(epochs=2, **common).train(a, x, y, seed=3)
    LSSTrainer(pool_size=1, epochs_per_member=2, lambda_a=0, lambda_d=0, **common).train(
        b, x, y, seed=3
    )
    assert _same_state(a, b)
    assert not _same_state(a, _model(kind))


@pytest.mark.parametrize(
    "options",
    [{}, {"interp_samples": 2, "importance": True, "diversity": "volume", "exclude_head": True}],
)
def test_deterministic(options: dict) -> None:
    x, y = _data()
    runs = []
    for seed in (5, 5, 6):
        model = _model("cnn")
        LSSTrainer(pool_size=3, batch_size=16, **options).train(model, x, y, seed=seed)
        runs.append(model)
    assert _same_state(runs[0], runs[1])
    assert not _same_state(runs[0], runs[2])


def test_batchnorm_buffers_follow_the_interpolated_passes() -> None:
    x, y = _data()
    model = _model("cnn")
    before = model.features[1].running_mean.clone()
    trainer = LSSTrainer(pool_size=2, epochs_per_member=1, batch_size=16, interp_samples=2)
    metrics = trainer.train(model, x, y, seed=0)
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["reg_loss"])
    # member 1: 4 steps x 1 pass (one member, one draw); member 2: 4 steps x 2 passes
    assert int(model.features[1].num_batches_tracked) == 4 + 8
    assert not torch.equal(model.features[1].running_mean, before)


def test_model_without_batchnorm() -> None:
    x, y = _data()
    model = _model("mlp")
    initial = copy.deepcopy(model)
    metrics = LSSTrainer(pool_size=2, batch_size=16).train(model, x, y, seed=0)
    assert metrics["distance_to_global"] > 0
    assert not _same_state(model, initial)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_head_identification() -> None:
    assert head_parameter_names(SmallCNN()) == ["head.3.weight", "head.3.bias"]
    assert head_parameter_names(MLP()) == ["net.3.weight", "net.3.bias"]
    assert head_parameter_names(nn.Linear(3, 2)) == ["weight", "bias"]
    with pytest.raises(ValueError, match="no nn.Linear"):
        head_parameter_names(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_exclude_head() -> None:
    x, y = _data()
    model = _model("cnn")
    initial = copy.deepcopy(model)
    trainer = Recorder(pool_size=2, epochs_per_member=1, batch_size=16, exclude_head=True)
    trainer.train(model, x, y, seed=0)
    state = trainer.state
    assert state is not None
    head = ["head.3.weight", "head.3.bias"]
    assert set(state.head) == set(head) and not set(head) & set(state.layout.names)
    total = sum(p.numel() for p in model.parameters())
    assert state.layout.dim == total - sum(state.head[n].numel() for n in head)
    # one shared copy: member 2 starts from where member 1 left the head, not from f_p
    start_2 = next(e for e in trainer.log if e["size"] == 1)["head"]
    assert not torch.equal(start_2["head.3.weight"], dict(initial.named_parameters())[head[0]])
    params = dict(model.named_parameters())
    for n in head:
        assert torch.equal(params[n], state.head[n])
    result = _flat(model, state.layout.names)
    torch.testing.assert_close(result, state.pool.rows[1:].mean(dim=0))


def test_importance_weights() -> None:
    x, y = _data()
    model = _model("cnn")
    initial = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    w = importance_weights(model, names, x, y, batch_size=16)
    assert w.shape == (sum(p.numel() for p in model.parameters()),)
    assert (w > 0).all() and torch.isfinite(w).all()
    torch.testing.assert_close(w.square().mean(), torch.tensor(1.0))
    assert w.std() > 0.1  # not uniform
    assert _same_state(model, initial)  # BatchNorm statistics untouched


def test_amp_is_ignored_on_cpu() -> None:
    x, y = _data()
    a, b = _model("cnn"), _model("cnn")
    LSSTrainer(pool_size=2, batch_size=16).train(a, x, y, seed=0)
    LSSTrainer(pool_size=2, batch_size=16, amp=True).train(b, x, y, seed=0)
    assert _same_state(a, b)


@pytest.mark.parametrize(
    "bad",
    [
        {"affinity": "cosine"},
        {"diversity": "entropy"},
        {"pool_size": 0},
        {"interp_samples": 0},
        {"lambda_d": -1.0},
        {"optimizer": "lion"},
        {"schedule": "linear"},
        {"lambda_units": "rms"},
        {"head_epochs": -1},
    ],
)
def test_bad_options(bad: dict) -> None:
    with pytest.raises(ValueError):
        LSSTrainer(**bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [False, True])
def test_cuda(amp: bool) -> None:
    x, y = _data()
    model = _model("cnn").cuda()
    metrics = LSSTrainer(pool_size=2, batch_size=16, amp=amp, importance=True).train(
        model, x.cuda(), y.cuda(), seed=0
    )
    assert math.isfinite(metrics["train_loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_authors_schedule_trains_later_members_an_eighth() -> None:
    x, y = _data()  # 64 samples, batch 16: 4 steps an epoch
    equal = Recorder(pool_size=3, epochs_per_member=8, batch_size=16)
    equal.train(_model("mlp"), x, y, seed=0)
    authors = Recorder(pool_size=3, epochs_per_member=8, batch_size=16, schedule="authors")
    authors.train(_model("mlp"), x, y, seed=0)
    sizes = [e["size"] for e in authors.log]
    assert [sizes.count(m) for m in range(3)] == [8 * 4, 1 * 4, 1 * 4]
    assert len(equal.log) == 3 * 8 * 4
    short = LSSTrainer(epochs_per_member=4, schedule="authors")
    assert [short.member_epochs(m) for m in range(3)] == [4, 1, 1]  # never 0 epochs


def test_diagnostics_report_the_pool() -> None:
    x, y = _data()
    model = _model("cnn")
    initial = copy.deepcopy(model)
    trainer = Recorder(pool_size=3, epochs_per_member=2, batch_size=16, lambda_a=1.0)
    metrics = trainer.train(model, x, y, seed=0)
    state = trainer.state
    assert state is not None
    d = state.layout.dim
    soup = _flat(model, state.layout.names)
    anchor = _flat(initial, state.layout.names)
    assert metrics["distance_to_global"] == pytest.approx(
        float((soup - anchor).norm()) / math.sqrt(d), rel=1e-4
    )
    members = state.pool.rows[1:]
    pairs = [float((members[i] - members[j]).norm()) for i in range(3) for j in range(i)]
    assert metrics["min_member_distance"] == pytest.approx(min(pairs) / math.sqrt(d), rel=1e-4)
    assert 0 < metrics["reg_to_loss_grad"] < 10
    off = LSSTrainer(pool_size=2, epochs_per_member=1, batch_size=16, lambda_a=0, lambda_d=0)
    assert off.train(_model("cnn"), x, y, seed=0)["reg_to_loss_grad"] == 0.0
    # a stronger pull gives a larger ratio, on the same data and seed
    strong = LSSTrainer(pool_size=3, epochs_per_member=2, batch_size=16, lambda_a=10.0)
    assert (
        strong.train(_model("cnn"), x, y, seed=0)["reg_to_loss_grad"] > metrics["reg_to_loss_grad"]
    )


def test_a_collapsed_pool_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    x, y = _data()
    with caplog.at_level("WARNING", logger="lssfl.training"):
        metrics = LSSTrainer(pool_size=3, epochs_per_member=1, batch_size=16, lr=0.0).train(
            _model("cnn"), x, y, seed=0
        )
    assert metrics["min_member_distance"] == 0.0
    (line,) = [r.getMessage() for r in caplog.records]
    assert "the pool collapsed" in line and "lower lambda_a" in line
    caplog.clear()
    with caplog.at_level("WARNING", logger="lssfl.training"):
        LSSTrainer(pool_size=3, epochs_per_member=1, batch_size=16, lr=1e-2).train(
            _model("cnn"), x, y, seed=0
        )
    assert not caplog.records


def test_the_probe_trains_the_head_alone_before_the_pool() -> None:
    """head_epochs: the shared head trains on f_p first (train mode, as the pool will run);
    the backbone is still f_p when the first member starts, and the probed head fits the
    local data better on it than the fresh one did."""
    x, y = _data()
    model = _model("cnn")
    initial = copy.deepcopy(model)
    trainer = Recorder(
        pool_size=2, epochs_per_member=1, batch_size=16, lr=1e-2, exclude_head=True, head_epochs=40
    )
    trainer.train(model, x, y, seed=5)
    first = trainer.log[0]
    torch.testing.assert_close(first["rows"][1], first["rows"][0], rtol=0, atol=0)
    backbone = {n: p for n, p in initial.named_parameters() if n not in first["head"]}
    torch.testing.assert_close(
        first["rows"][0], torch.cat([p.reshape(-1) for p in backbone.values()])
    )

    def loss(head: dict[str, torch.Tensor]) -> float:
        reference = copy.deepcopy(initial).eval()
        with torch.no_grad():
            return float(F.cross_entropy(functional_call(reference, head, (x,)), y))

    fresh = {n: p.detach() for n, p in initial.named_parameters() if n in first["head"]}
    assert loss(first["head"]) < loss(fresh) - 0.02
    none = Recorder(
        pool_size=2, epochs_per_member=1, batch_size=16, exclude_head=True, head_epochs=0
    )
    none.train(_model("cnn"), x, y, seed=5)
    assert all(torch.equal(none.log[0]["head"][n], fresh[n]) for n in fresh)


def test_head_epochs_without_a_shared_head_do_nothing() -> None:
    x, y = _data()
    a, b = _model("cnn"), _model("cnn")
    LSSTrainer(pool_size=2, epochs_per_member=1, batch_size=16, head_epochs=5).train(
        a, x, y, seed=1
    )
    LSSTrainer(pool_size=2, epochs_per_member=1, batch_size=16, head_epochs=0).train(
        b, x, y, seed=1
    )
    assert _same_state(a, b)
    assert LSSTrainer(exclude_head=True).local_epochs() == 8 + 4 * 8
    assert LSSTrainer(head_epochs=8).local_epochs() == 4 * 8


def test_defaults_and_the_paper_preset() -> None:
    from lssfl.training.lss import PaperLSSTrainer
    from lssfl.training.trainers import make_trainer

    default, paper = LSSTrainer(), make_trainer({"name": "lss-paper"})
    assert isinstance(paper, PaperLSSTrainer)
    assert (default.lambda_a, default.lambda_d, default.head_epochs) == (0.0, 0.0, 8)
    assert (paper.lambda_a, paper.lambda_d, paper.head_epochs) == (3.0, 3.0, 0)
    # Everything else is the paper's protocol in both.
    same = {"pool_size": 4, "epochs_per_member": 8, "batch_size": 64, "lr": 5e-4}
    for trainer in (default, paper):
        assert {k: getattr(trainer, k) for k in same} == same


def test_pool_spread_and_disagreement_are_measured_as_defined() -> None:
    """pool_spread: the members' mean pairwise distance over their mean distance from f_p;
    pool_disagreement: the mean over member pairs of the fraction of samples on which their
    predicted classes differ (eval mode); soup and member losses on the same samples."""
    x, y = _data(96)
    model = _model("cnn")
    trainer = Recorder(
        pool_size=3, epochs_per_member=2, batch_size=16, lr=3e-3, exclude_head=True, lambda_d=1
    )
    metrics = trainer.train(model, x, y, seed=2)
    state = trainer.state
    assert state is not None
    rows = state.pool.rows
    members, anchor = rows[1:], rows[0]
    pairs = [(i, j) for i in range(3) for j in range(i + 1, 3)]
    mean_pair = sum(float((members[i] - members[j]).norm()) for i, j in pairs) / 3
    mean_travel = sum(float((m - anchor).norm()) for m in members) / 3
    assert metrics["pool_spread"] == pytest.approx(mean_pair / mean_travel, rel=1e-4)
    assert metrics["pool_spread"] > 0.1  # alive: lr 3e-3, pushed apart

    model.eval()
    preds, losses = [], []
    for row in members:
        params = dict(zip(state.layout.names, state.layout.views(row), strict=True))
        with torch.no_grad():
            logits = functional_call(model, params | dict(state.head), (x,))
        preds.append(logits.argmax(1))
        losses.append(float(F.cross_entropy(logits, y)))
    disagree = [float((preds[i] != preds[j]).double().mean()) for i, j in pairs]
    assert metrics["pool_disagreement"] == pytest.approx(sum(disagree) / 3)
    assert metrics["member_loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    with torch.no_grad():
        soup_loss = float(F.cross_entropy(model(x), y))  # the model holds the soup now
    assert metrics["soup_loss"] == pytest.approx(soup_loss, rel=1e-5)


def test_the_coordinator_line_for_collapsed_pools() -> None:
    from lssfl.training.lss_measures import collapsed_pools

    assert collapsed_pools({}) is None
    assert collapsed_pools({"a": 0.05, "b": 0.5}) is None  # half is not most
    line = collapsed_pools({"a": 0.05, "b": 0.02, "c": 0.9})
    assert line is not None
    assert "collapsed at 2 of 3 silos (a, b: spread 0.020-0.050, alive from 0.1)" in line
    assert "lower trainer.lambda_a" in line
