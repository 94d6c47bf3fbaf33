"""The initial global model: pre-trained on the embedded public split, cached on disk.

As in the paper's setting (ImageNet weights, a new classifier for the task), the start is a
generalist backbone with a fresh head: the model is trained on the public split, rendered in
every domain, and then its classifier (last ``nn.Linear``) is initialised again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lssfl.common.config import RunConfig
from lssfl.common.models import build_model, evaluate, head_linear
from lssfl.common.seeding import derive_seed
from lssfl.dataprep.splits import load_split
from lssfl.server.store import save_state
from lssfl.training.trainers import FedAvgTrainer

log = logging.getLogger("lssfl.coordinator")


def initial_state(cfg: RunConfig, pretrain_dir: Path | None) -> dict[str, torch.Tensor]:
    """The round-0 global model for ``cfg``: pretrained weights, random, or pre-trained here.

    ``model.init: pretrain`` trains on ``pretrain_dir`` (cached there by a key of everything
    the weights depend on) and then initialises the head again.
    """
    if cfg.model.init == "pretrained":
        from lssfl.server.pretrained import pretrained_model

        num_classes = int(cfg.model.kwargs.get("num_classes", 10))
        torch.manual_seed(derive_seed(cfg.run.seed, 0, "head"))
        net = pretrained_model(cfg.model.name, num_classes, cfg.model.weights)
        log.info("initial model: %s weights from %s", cfg.model.name, cfg.model.weights)
        return net.state_dict()
    torch.manual_seed(derive_seed(cfg.run.seed, 0, "init"))
    model = build_model(cfg.model_spec)
    if cfg.model.init == "random" or pretrain_dir is None:
        return model.state_dict()
    key = json.dumps(
        {
            "model": cfg.model_spec,
            "epochs": cfg.model.pretrain_epochs,
            "seed": cfg.run.seed,
            "data": (pretrain_dir / "meta.json").read_text(),
            "head": "reinitialised",
        },
        sort_keys=True,
    )
    cache = pretrain_dir / f"pretrained-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if cache.exists():
        try:
            state = load_file(cache)
            model.load_state_dict(state)
            log.info("initial model: cached pre-trained weights %s", cache)
            return model.state_dict()
        except (SafetensorError, RuntimeError, OSError) as exc:
            log.warning("ignoring unreadable cache %s (%s); pre-training again", cache, exc)
    split = load_split(pretrain_dir)
    trainer = FedAvgTrainer(epochs=cfg.model.pretrain_epochs, batch_size=32, lr=1e-3)
    trainer.train(model, split.x, split.y, seed=derive_seed(cfg.run.seed, 0, "pretrain"))
    acc, _ = evaluate(model, split.x, split.y)
    torch.manual_seed(derive_seed(cfg.run.seed, 0, "head"))
    head_linear(model)[1].reset_parameters()
    log.info(
        "initial model: pre-trained %d epochs on %d public samples (train accuracy %.3f), "
        "classifier head initialised again",
        cfg.model.pretrain_epochs,
        split.num_samples,
        acc,
    )
    save_state(cache, model.state_dict())
    return model.state_dict()
