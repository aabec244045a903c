"""Parameter groups come from the modules: decay on weight matrices only, reduced lr for pretrained weights."""

from __future__ import annotations

from torch import nn

from scale.config import OptimizerConfig
from scale.model import SCALE
from scale.optim import build_optimizer, parameter_groups
from tests.conftest import tiny_config


def group_of(groups, parameter):
    return next(g for g in groups if any(p is parameter for p in g["params"]))


def test_groups_decay_matrices_only_and_cover_every_parameter_once():
    model = SCALE(tiny_config())
    groups = parameter_groups(model, OptimizerConfig(lr=1e-4, weight_decay=0.05))
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert group_of(groups, module.weight)["weight_decay"] == 0.05
            if module.bias is not None:
                assert group_of(groups, module.bias)["weight_decay"] == 0.0
        if isinstance(module, nn.LayerNorm):
            assert group_of(groups, module.weight)["weight_decay"] == 0.0
        if isinstance(module, nn.Embedding):
            assert group_of(groups, module.weight)["weight_decay"] == 0.0
    assert all(g["lr"] == 1e-4 for g in groups)  # nothing pretrained here


def test_pretrained_text_tower_gets_the_reduced_learning_rate():
    config = tiny_config()
    config.text.pretrained = "minilm"
    model = SCALE(config)
    groups = parameter_groups(model, OptimizerConfig(lr=1e-4, pretrained_lr=1e-5))
    bert = model.encoders["text"].tower.bert
    assert group_of(groups, bert.encoder.layer[0].attention.self.query.weight)["lr"] == 1e-5
    assert group_of(groups, bert.embeddings.word_embeddings.weight)["lr"] == 1e-5
    # The projection and LM transform around the pretrained BERT are new: full learning rate.
    assert group_of(groups, model.encoders["text"].tower.project.weight)["lr"] == 1e-4
    assert group_of(groups, model.fusion.type_embedding.weight)["lr"] == 1e-4


def test_schedule_warms_up_then_decays():
    model = SCALE(tiny_config())
    optimizer, scheduler = build_optimizer(model, OptimizerConfig(lr=1e-3, warmup_ratio=0.1), max_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and max(lrs) == lrs[10] == 1e-3 and lrs[-1] < 2e-5


def test_fused_adamw_only_where_every_parameter_is_on_cuda():
    model = SCALE(tiny_config())
    optimizer, _ = build_optimizer(model, OptimizerConfig(), max_steps=10)
    assert not optimizer.defaults["fused"]  # CPU: PyTorch's default loop
    assert not build_optimizer(model, OptimizerConfig(fused=False), 10)[0].defaults["fused"]


def test_activation_checkpointing_keeps_losses_gradients_and_checkpoint_keys():
    """`SCALEModule(activation_checkpointing=True)` wraps every transformer block: the same loss
    and gradients (blocks recomputed in the backward), the same state-dict keys (exports load)."""
    import torch

    from scale.module import SCALEModule
    from tests.test_model import all_patterns, random_batch

    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = SCALEModule(tiny_config(), activation_checkpointing=checkpointing)
        module.configure_model()
        module.model.eval()  # no dropout: the recomputation must see the same numbers
        torch.manual_seed(1)
        batch = random_batch(module.config, all_patterns())
        torch.manual_seed(2)
        loss = module.model(batch, masked_modeling=True, returns="losses")["loss"]
        loss.backward()
        results.append((module, loss))
    (plain, plain_loss), (wrapped, wrapped_loss) = results
    assert any(type(m).__name__ == "CheckpointWrapper" for m in wrapped.model.modules())
    assert plain.state_dict().keys() == wrapped.state_dict().keys()
    torch.testing.assert_close(wrapped_loss, plain_loss)
    for (name, a), b in zip(plain.model.named_parameters(), wrapped.model.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
