"""Parameter groups built from the modules, and the warmup-then-decay schedule.

The official code picks the reduced BERT learning rate by a parameter-name prefix that exists only
under DataParallel (so on one GPU every weight gets 1e-4), and its weight-decay rule is inverted.
Here groups come from module types and from the `is_pretrained` flag of the towers:

- decay: the weight matrices of Linear and Conv layers (and nothing else);
- no decay: biases, normalisation parameters, embeddings, positions and learned tokens;
- `pretrained_lr` for every parameter a module loaded from a pretrained checkpoint (a module with
  `is_pretrained` set, e.g. the text BERT) names in its `pretrained_parameters()`.
"""

from __future__ import annotations

from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from scale.config import OptimizerConfig

DECAYED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def parameter_groups(model: nn.Module, config: OptimizerConfig) -> list[dict]:
    pretrained: set[int] = set()
    for module in model.modules():
        if getattr(module, "is_pretrained", False):
            pretrained.update(id(p) for p in module.pretrained_parameters())
    decayed = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, DECAYED_TYPES) and module.weight is not None
    }
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for parameter in model.parameters():  # deduplicated: a shared tower appears once
        if parameter.requires_grad:
            groups.setdefault((id(parameter) in pretrained, id(parameter) in decayed), []).append(parameter)
    return [
        {
            "params": params,
            "lr": config.pretrained_lr if is_pretrained else config.lr,
            "weight_decay": config.weight_decay if is_decayed else 0.0,
            "name": f"{'pretrained' if is_pretrained else 'new'}/{'decay' if is_decayed else 'no_decay'}",
        }
        for (is_pretrained, is_decayed), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, config: OptimizerConfig, max_steps: int) -> tuple[Optimizer, LambdaLR]:
    if max_steps <= 0:
        raise ValueError("trainer.max_steps must be set (> 0), or trainer.max_epochs with data.mode=exact: "
                         "the schedule needs a length and a resampled stream is infinite")
    groups = parameter_groups(model, config)
    fused = config.fused
    if fused is None:
        fused = all(p.is_cuda for group in groups for p in group["params"])
    optimizer = AdamW(groups, betas=config.betas, fused=fused or None)
    warmup = int(config.warmup_ratio * max_steps)
    make = get_linear_schedule_with_warmup if config.schedule == "linear" else get_cosine_schedule_with_warmup
    return optimizer, make(optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)
