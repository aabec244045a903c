"""The model on batches with every pattern of missing modalities."""

from __future__ import annotations

from itertools import product

import pytest
import torch

from scale.config import MODALITIES
from scale.model import SCALE
from scale.modalities import stem_class
from tests.conftest import tiny_config


def random_batch(config, present: torch.Tensor, fill_absent: float | None = None) -> dict:
    """A batch with random valid inputs (each registered modality's stem's `example`, under the
    config's stems: pixels / regions, frames / features, waveform / mel); `present` is (B, M) bool
    in MODALITIES order. `fill_absent` overwrites absent samples' float inputs (e.g. NaN) to prove
    they are never read."""
    B = present.shape[0]
    batch = {name: stem_class(config, name).example(getattr(config, name), B) for name in MODALITIES}
    for index, name in enumerate(MODALITIES):
        batch[name]["present"] = present[:, index].clone()
        if fill_absent is not None:
            for key, value in batch[name].items():
                if value.is_floating_point():
                    value[~present[:, index]] = fill_absent
    return batch


def all_patterns() -> torch.Tensor:
    """Every non-empty subset of the five modalities: 31 samples."""
    rows = [p for p in product([False, True], repeat=len(MODALITIES)) if any(p)]
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def model() -> SCALE:
    torch.manual_seed(0)
    return SCALE(tiny_config())


def test_every_missing_pattern_forward_backward_finite(model):
    torch.manual_seed(1)
    present = all_patterns()
    batch = random_batch(model.config, present)
    model.zero_grad()
    losses = model.losses(model(batch, masked_modeling=True))
    for name, value in losses.items():
        assert torch.isfinite(value), name
    expected = {"loss", "contrastive"} | {f"masked/{m}" for m in MODALITIES}
    assert expected <= set(losses)
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_gradients_reach_inputs_only_where_present(model):
    """A sample's input receives gradient iff that modality is present for that sample."""
    torch.manual_seed(2)
    present = all_patterns()
    batch = random_batch(model.config, present)
    for name in ("image", "video", "audio"):  # the prepared inputs (floats) that gradients reach
        batch[name] = model.encoders[name].prepare(batch[name])
    leaves = {"image": batch["image"]["pixels"], "video": batch["video"]["frames"], "audio": batch["audio"]["fbank"]}
    for tensor in leaves.values():
        tensor.requires_grad_(True)
    model.zero_grad()
    model.losses(model(batch, masked_modeling=True))["loss"].backward()
    for name, tensor in leaves.items():
        per_sample = tensor.grad.flatten(1).abs().sum(1)
        column = present[:, MODALITIES.index(name)]
        assert torch.all(per_sample[~column] == 0), f"{name}: gradient reached absent samples"
        assert torch.all(per_sample[column] > 0), f"{name}: present samples got no gradient"


def assert_losses_gradients_embeddings_finite(model, batch) -> None:
    """Losses, every gradient and every embedding of `batch` are finite (NaN planted in ignored slots)."""
    model.zero_grad()
    losses = model.losses(model(batch, masked_modeling=True))
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    embeddings = model.embed(batch)
    model.train()
    assert all(torch.isfinite(e).all() for e in embeddings.values())


def test_absent_inputs_set_to_nan_never_reach_outputs(model):
    torch.manual_seed(3)
    assert_losses_gradients_embeddings_finite(model, random_batch(model.config, all_patterns(), fill_absent=float("nan")))


def assert_embeddings_unchanged(model, batch, change) -> None:
    """`change(batch)` edits only inputs the model must ignore: no embedding may move."""
    model.eval()
    before = model.embed(batch)
    change(batch)
    after = model.embed(batch)
    model.train()
    for name in before:
        torch.testing.assert_close(before[name], after[name], msg=name)


def assert_every_parameter_gets_a_gradient(model, present) -> None:
    """DDP (no find_unused_parameters) needs a gradient for every parameter on every step."""
    model.zero_grad(set_to_none=True)
    model.losses(model(random_batch(model.config, present), masked_modeling=True))["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


def test_absent_modality_does_not_change_present_embeddings(model):
    """Changing an absent modality's input must not move any output of that sample."""
    torch.manual_seed(4)
    present = torch.tensor([[True, True, True, False, False]] * 2)

    def scramble_video(batch):
        batch["video"]["frames"] = torch.randint_like(batch["video"]["frames"], 0, 256)

    assert_embeddings_unchanged(model, random_batch(model.config, present), scramble_video)


def test_sample_without_any_modality_is_a_clear_error(model):
    present = torch.zeros(2, 5, dtype=torch.bool)
    present[0, 0] = True
    with pytest.raises(ValueError, match="no present modality"):
        model(random_batch(model.config, present))


def test_masked_tasks_score_only_masked_positions_of_present_samples(model):
    torch.manual_seed(5)
    present = all_patterns()
    batch = random_batch(model.config, present)
    output = model(batch, masked_modeling=True)
    for index, name in enumerate(MODALITIES):
        masked = output.masked[name]
        rows = masked.positions.any(dim=1)
        assert not rows[~present[:, index]].any(), f"{name}: masked positions in absent samples"
        assert masked.targets.shape[0] == masked.positions.sum()
    # The text targets are the original ids at the masked positions.
    text = output.masked["text"]
    assert torch.equal(text.targets, batch["text"]["input_ids"][text.positions])


def test_disabled_masked_task_is_not_computed():
    config = tiny_config()
    config.text.masked_modeling = False
    config.audio.masked_modeling = False
    model = SCALE(config)
    losses = model.losses(model(random_batch(config, all_patterns()), masked_modeling=True))
    assert "masked/text" not in losses and "masked/audio" not in losses
    assert torch.isfinite(losses["loss"])


def test_table_entity_masking_masks_whole_keys_or_values(model):
    torch.manual_seed(6)
    config = model.config
    present = torch.ones(64, 5, dtype=torch.bool)
    batch = random_batch(config, present)
    masked = model.encoders["table"].mask(model.encoders["table"].sanitize(batch["table"], present[:, 1]), present[:, 1])
    entity, role = batch["table"]["entity_index"], batch["table"]["entity_role"]
    assert masked.positions.any()
    for b in range(64):
        for e, r in {(int(entity[b, i]), int(role[b, i])) for i in masked.positions[b].nonzero().flatten()}:
            span = (entity[b] == e) & (role[b] == r) & (batch["table"]["attention_mask"][b] == 1)
            span &= batch["table"]["input_ids"][b] != 0
            assert masked.positions[b][span].all(), "an entity span was only partly masked"


def test_modality_absent_from_whole_batch_still_gives_every_parameter_a_gradient(model):
    present = torch.ones(6, 5, dtype=torch.bool)
    present[:, MODALITIES.index("video")] = False
    assert_every_parameter_gets_a_gradient(model, present)


def test_losses_without_details_are_the_same_objective_with_fewer_parts():
    """`details=False` (training steps the logger does not write): the same loss, without the
    per-pair losses and mean weights whose selection reads counts on the host."""
    config = tiny_config()
    torch.manual_seed(0)
    model = SCALE(config).eval()
    torch.manual_seed(1)
    batch = random_batch(config, all_patterns())
    detailed = model(batch, returns="losses", details=True)
    plain = model(batch, returns="losses", details=False)
    assert torch.equal(plain["loss"], detailed["loss"]) and set(plain) < set(detailed)
    assert not [k for k in plain if k.startswith(("contrastive/", "harmonization/"))]
    assert [k for k in detailed if k.startswith("contrastive/")] and [k for k in detailed if k.startswith("harmonization/")]
