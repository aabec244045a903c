"""`model.config.micro_batches`: the batch's encoders and fusion in pieces under checkpointing,
the contrastive loss over the whole batch."""

from __future__ import annotations

import pytest
import torch

import scale.model
from scale.model import SCALE
from tests.conftest import tiny_config
from tests.test_model import all_patterns, random_batch


def _double(batch):
    return {m: {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()} for m, inputs in batch.items()}


def _losses_and_grads(config, batch, masked_modeling, train, seed=2):
    torch.manual_seed(0)
    model = SCALE(config).double().train(train)
    torch.manual_seed(seed)
    losses = model(batch, masked_modeling=masked_modeling, returns="losses")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(losses["loss"], [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return losses, dict(zip(names, grads))


def _assert_same(first, second, rtol=1e-9):
    (losses_a, grads_a), (losses_b, grads_b) = first, second
    for key in ("loss", "contrastive"):
        torch.testing.assert_close(losses_a[key], losses_b[key], rtol=rtol, atol=1e-12, msg=key)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        if grad is None:
            assert grads_b[name] is None, name
        else:
            torch.testing.assert_close(grads_b[name], grad, rtol=rtol * 100, atol=1e-10, msg=name)


@pytest.mark.parametrize("micro_batches", [2, 5])
def test_micro_batches_give_the_whole_batch_contrastive_loss_and_gradients(micro_batches):
    """Every missing-modality pattern (31 samples: pieces of unequal size, pieces without some
    modality), the learned harmonization matrix and temperature: the contrastive loss over the
    pieces' features and every parameter's gradient equal the one-pass run's (eval mode, no
    masking, where the two compute the same formula)."""
    overrides = {"harmonization": {"mode": "learned"}, "contrastive": {"learn_temperature": True}}
    torch.manual_seed(1)
    batch = _double(random_batch(tiny_config(), all_patterns()))
    whole = _losses_and_grads(tiny_config(**overrides), batch, masked_modeling=False, train=False)
    pieces = _losses_and_grads(tiny_config(micro_batches=micro_batches, **overrides), batch, masked_modeling=False, train=False)
    _assert_same(whole, pieces)
    assert whole[1]["logit_scale"].abs() > 0 and whole[1]["harmonization_matrix"].abs().sum() > 0


def test_checkpointed_pieces_replay_their_masks_and_dropout(monkeypatch):
    """In training (masking and dropout drawn at random), the backward pass recomputes each piece
    with the random state of its forward pass: the gradients equal those of the same pieces kept
    whole in memory (no checkpoint)."""
    config = tiny_config(micro_batches=3)
    torch.manual_seed(1)
    batch = _double(random_batch(config, all_patterns()))
    checkpointed = _losses_and_grads(config, batch, masked_modeling=True, train=True)
    monkeypatch.setattr(scale.model, "checkpoint", lambda function, *args, use_reentrant: function(*args))
    in_memory = _losses_and_grads(config, batch, masked_modeling=True, train=True)
    _assert_same(checkpointed, in_memory, rtol=1e-12)
    assert any(key.startswith("masked/") for key in checkpointed[0])
    # The pieces really draw at random: another seed gives other masks, another loss.
    other = _losses_and_grads(config, batch, masked_modeling=True, train=True, seed=3)
    assert not torch.isclose(other[0]["loss"], checkpointed[0]["loss"])


def test_micro_batches_keep_only_the_pieces_outputs_for_the_backward():
    """What autograd keeps between forward and backward (counted with saved-tensor hooks outside
    the checkpoint) shrinks with pieces: the encoders' and fusion's activations are recomputed."""

    def saved_bytes(micro_batches):
        config = tiny_config(micro_batches=micro_batches)
        torch.manual_seed(0)
        model = SCALE(config)
        torch.manual_seed(1)
        batch = random_batch(config, all_patterns())
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            losses = model(batch, masked_modeling=True, returns="losses")
        losses["loss"].backward()
        return total

    whole, pieces = saved_bytes(1), saved_bytes(4)
    assert pieces < whole / 4, (whole, pieces)


def test_micro_batches_must_be_positive():
    with pytest.raises(ValueError, match="model.config.micro_batches=0"):
        tiny_config(micro_batches=0)
