"""``python -m tokred train-policy`` and the policy stage of ``run``: fit the component a reducer needs.

Which reducers need one is asked of the reducer classes (``needs_fitting(kwargs)`` / ``fitting_key()``, e.g.
dCTS/CTS with ``policy=cnn`` and no ``policy_checkpoint``), never decided from their names.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tokred.config import build_datasets, resolve_device, seed_everything
from tokred.structured import reducer_kwargs
from tokred.io import policy_cache_path

__all__ = ["ensure_policy", "fitting_slot", "policy_backbone", "policy_path", "train_policy_job"]

log = logging.getLogger("tokred")


def fitting_slot(cfg: DictConfig, ignore_existing: bool = False) -> tuple[str, dict[str, Any], str] | None:
    """The reducer slot whose component must be fitted before training, or None.

    Args:
        ignore_existing: ask whether the reducer *could* be fitted (its fitted file treated as absent), as
            ``train-policy`` does.

    Returns:
        ``(slot, constructor kwargs, fitting key)``, e.g. ``("merger", {...}, "policy_checkpoint")``.
    """
    from tokred.plugins import REDUCERS

    for slot, (name, kwargs) in reducer_kwargs(cfg).items():
        cls = REDUCERS.get(name)
        key = cls.fitting_key()
        if cls.needs_fitting({**kwargs, key: None} if (ignore_existing and key) else kwargs):
            return slot, kwargs, key
    return None


def policy_backbone(cfg: DictConfig, kwargs: dict[str, Any]) -> str:
    """The policy CNN the reducer will build (``"auto"`` resolved for ``model.embed_dim``)."""
    from tokred.policy.network import resolve_policy_backbone

    return resolve_policy_backbone(str(kwargs.get("policy_backbone", "auto")), cfg.model.get("embed_dim"))


def policy_path(cfg: DictConfig, kwargs: dict[str, Any]) -> Path:
    """``policy.out``, else the shared cache file for this data set, crop, policy backbone and levels."""
    if cfg.policy.out:
        return Path(cfg.policy.out)
    from tokred.config import input_normalization

    return policy_cache_path(str(cfg.dataset.name), tuple(cfg.dataset.crop_size), policy_backbone(cfg, kwargs),
                             list(kwargs.get("levels") or [2]), normalization=input_normalization(cfg).name)


def train_policy_job(cfg: DictConfig, quiet: bool = False) -> dict[str, Any]:
    """``python -m tokred train-policy merger=dcts [dataset=...]``: trains the superpatch policy network on
    ground-truth window uniformity (methods.md Sec. 1-2), reports per-level precision/recall on
    ``policy.val_split`` and saves it (never over an existing file).

    Raises:
        ValueError: no configured reducer has a component to fit (e.g. merger=none, or policy=oracle).
        FileExistsError: the output file exists.
    """
    from tokred.policy import build_policy, train_policy

    found = fitting_slot(cfg, ignore_existing=True)
    if found is None:
        raise ValueError(f"train-policy: neither merger={cfg.merger.name} nor pruner={cfg.pruner.name} has a "
                         "policy network to train; use merger=dcts or merger=cts with policy=cnn")
    _, kwargs, _ = found
    out = policy_path(cfg, kwargs)
    if out.exists():
        raise FileExistsError(f"{out} exists; delete it or pass policy.out=OTHER_PATH")
    seed_everything(int(cfg.seed))
    device = resolve_device(cfg.device)
    levels = list(kwargs.get("levels") or [2])
    policy = build_policy(levels, int(cfg.model.patch_size), policy_backbone(cfg, kwargs))
    thresholds = kwargs.get("thresholds")
    train_ds = build_datasets(cfg, train=True)
    epochs = int(cfg.policy.epochs)
    min_steps = int(cfg.policy.get("min_steps") or 0)
    per_epoch = -(-len(train_ds) // int(cfg.policy.batch_size))
    if min_steps and epochs * per_epoch < min_steps:  # small sets (the embedded sample): train by steps
        epochs = -(-min_steps // per_epoch)
        log.info("policy: %d images give %d steps per epoch; training %d epochs (policy.min_steps=%d)",
                 len(train_ds), per_epoch, epochs, min_steps)
    res = train_policy(train_ds, build_datasets(cfg, train=False, split=cfg.policy.val_split),
                       policy, epochs, lr=float(cfg.policy.lr), batch_size=int(cfg.policy.batch_size),
                       device=device, out_path=out, thresholds=thresholds, num_workers=int(cfg.train.num_workers),
                       max_steps=cfg.policy.max_steps, seed=int(cfg.seed), keep=str(cfg.policy.get("keep", "best")))
    if not quiet:  # the policy stage of run logs its summary instead (run.log)
        shown = {k: v for k, v in res.items() if k not in ("history", "pr_curves", "curve")}
        sys.stdout.write(json.dumps(shown, indent=2, default=str) + "\n")
    return res


def ensure_policy(cfg: DictConfig, writer: bool = True) -> bool:
    """Before ``run``: reuse the cached fitted component of a reducer that needs one, or train it first
    (``policy.reuse=false`` always trains a fresh one at ``policy.out``), and point the config at it.

    Under torchrun this runs on every rank before the process group exists (no rank waits on another, so no
    collective can time out): ranks other than 0 (``writer=False``) reuse the cached file when it is there,
    else train the same policy into a private temporary file; DDP then copies rank 0's weights to all ranks.

    Returns:
        True when ``cfg`` was changed (the model must be built again).

    Raises:
        FileExistsError: ``policy.reuse=false`` but the output file exists.
    """
    found = fitting_slot(cfg)
    if found is None:
        return False
    slot, kwargs, key = found
    path = policy_path(cfg, kwargs)
    if path.exists() and cfg.policy.reuse:
        log.info("reusing trained policy %s", path)
    elif not writer:
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="tokred-policy-")) / path.name
        OmegaConf.set_struct(cfg, False)
        cfg.policy.out = str(path)
        OmegaConf.set_struct(cfg, True)
        train_policy_job(cfg, quiet=True)
    else:
        if path.exists():
            raise FileExistsError(f"policy.reuse=false but {path} exists; pass policy.out=NEW_PATH")
        log.info("policy stage: training the %s policy network first -> %s", cfg[slot].name, path)
        res = train_policy_job(cfg, quiet=True)
        log.info("policy stage done: %s", {k: (round(v, 4) if isinstance(v, float) else v)
                                           for k, v in res.items() if k != "history" and not isinstance(v, dict)})
    OmegaConf.set_struct(cfg, False)
    cfg[slot][key] = str(path)
    OmegaConf.set_struct(cfg, True)
    return True
