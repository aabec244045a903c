"""Packed (length buckets, absent samples skipped) against padded: the same outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from scale.model import SCALE
from scale.modalities.transformer import TokenTransformer
from scale.packing import length_buckets
from tests.conftest import tiny_config
from tests.test_model import all_patterns, random_batch


@pytest.mark.parametrize("max_padding", [0.0, 0.1, 0.5])
def test_buckets_cover_every_sample_once_within_the_padding_bound(max_padding):
    lengths = torch.randint(1, 60, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    buckets = length_buckets(lengths, max_padding)
    assert sorted(i for b in buckets for i in b) == list(range(200))
    for bucket in buckets:
        longest = max(lengths[i] for i in bucket)
        assert lengths[bucket[0]] == longest
        assert all(longest - lengths[i] <= max_padding * longest for i in bucket)  # each sample's padding
        assert len(bucket) * longest * (1 - max_padding) <= sum(lengths[i] for i in bucket) + 1e-9
    if max_padding == 0.0:  # no padding at all: one bucket per distinct length
        assert len(buckets) == len(set(lengths))


def test_samples_missing_a_large_segment_never_join_a_bucket_of_complete_ones():
    """2 of 8 fused sequences without video and audio (137 of 197 tokens): a bound on the bucket's
    total padding let them join the complete six and pay for the missing tokens in full."""
    lengths = [197] * 6 + [137] * 2
    assert sorted(map(sorted, length_buckets(lengths, 0.1))) == [[0, 1, 2, 3, 4, 5], [6, 7]]
    # Within the bound they still share one: a title 10 tokens short is padded.
    assert length_buckets([197] * 6 + [187] * 2, 0.1) == [list(range(8))]


def test_packed_transformer_equals_padded_on_real_tokens_and_zeros_elsewhere():
    torch.manual_seed(0)
    transformer = TokenTransformer(32, 2, 4, 2.0, max_tokens=20).double()
    tokens = torch.randn(9, 20, 32, dtype=torch.float64, requires_grad=True)
    # Real tokens anywhere (a missing middle segment, right padding), one sample fully real.
    token_mask = torch.rand(9, 20) > 0.4
    token_mask[:, 0] = True
    token_mask[3] = True
    weights = torch.randn(9, 20, 32, dtype=torch.float64)

    def run(packed):
        out = transformer(tokens, token_mask, packed=packed)
        loss = (out * weights * token_mask[..., None]).sum()
        return out, torch.autograd.grad(loss, [tokens, *transformer.parameters()])

    packed, packed_grads = run(True)
    padded, padded_grads = run(False)
    torch.testing.assert_close(packed[token_mask], padded[token_mask], rtol=1e-10, atol=1e-12)
    assert packed[~token_mask].abs().max() == 0
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_packed_model_gives_the_padded_losses_and_gradients():
    """The whole model on every missing-modality pattern with masked modelling and titles / tables
    of every length: each encoder sees only its present samples, BERT and the fusion run in
    buckets, yet every loss and every parameter's
    gradient equal the padded run's (eval mode: dropout would draw per batch shape)."""
    results = {}
    for packed in (True, False):
        config = tiny_config()
        config.pack_tokens = packed
        torch.manual_seed(0)
        model = SCALE(config).double().eval()
        torch.manual_seed(1)
        batch = random_batch(config, all_patterns())
        batch = {m: {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()} for m, inputs in batch.items()}
        for name in ("text", "table"):  # titles and tables of every length: right padding
            mask = batch[name]["attention_mask"]
            lengths = torch.randint(2, mask.shape[1] + 1, (mask.shape[0],))
            mask[torch.arange(mask.shape[1])[None, :] >= lengths[:, None]] = 0
            batch[name]["input_ids"][mask == 0] = 0
        torch.manual_seed(2)
        losses = model.losses(model(batch, masked_modeling=True))
        grads = torch.autograd.grad(losses["loss"], list(model.parameters()), allow_unused=True)
        results[packed] = losses, dict(zip((n for n, _ in model.named_parameters()), grads))
    (packed_losses, packed_grads), (padded_losses, padded_grads) = results[True], results[False]
    assert packed_losses.keys() == padded_losses.keys()
    for key in padded_losses:
        torch.testing.assert_close(packed_losses[key], padded_losses[key], rtol=1e-9, atol=1e-12, msg=key)
    for name, grad in padded_grads.items():
        if grad is None:
            assert packed_grads[name] is None, name
        else:
            torch.testing.assert_close(packed_grads[name], grad, rtol=1e-7, atol=1e-10, msg=name)


def test_a_modality_absent_from_the_whole_batch_still_gets_a_gradient():
    """DDP without find_unused_parameters needs every parameter in the graph on every rank."""
    config = tiny_config()
    model = SCALE(config)
    present = all_patterns()
    present = present[~present[:, 3]]  # no sample with video
    losses = model.losses(model(random_batch(config, present), masked_modeling=True))
    losses["loss"].backward()
    video = [p for p in model.encoders["video"].parameters() if p.requires_grad]
    assert video and all(p.grad is not None for p in video)


def test_one_bucket_mode_reaches_every_packed_module_and_changes_nothing(monkeypatch):
    """`SCALE.use_one_bucket` (FSDP, DeepSpeed): every packed transformer and BERT tower groups its
    rows into one bucket per call, with the same losses as the bucketed run."""
    import scale.packing

    calls = []
    original = scale.packing.length_buckets

    def spy(lengths, max_padding=0.1, one_bucket=False):
        calls.append(one_bucket)
        return original(lengths, max_padding, one_bucket)

    monkeypatch.setattr(scale.packing, "length_buckets", spy)
    config = tiny_config()
    torch.manual_seed(0)
    model = SCALE(config).double().eval()
    torch.manual_seed(1)
    batch = random_batch(config, all_patterns())
    batch = {m: {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()} for m, inputs in batch.items()}
    bucketed = model(batch, returns="losses")
    assert calls and not any(calls)
    calls.clear()
    model.use_one_bucket(True)
    one = model(batch, returns="losses")
    assert calls and all(calls)
    for key in bucketed:
        torch.testing.assert_close(one[key], bucketed[key], rtol=1e-9, atol=1e-12, msg=key)
