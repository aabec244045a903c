"""`SCALEModule(compile=True)` (`--model.compile true`): torch.compile reaches every encoder and the
fusion, and computes what eager mode computes."""

from __future__ import annotations

import pytest
import torch

from scale.module import SCALEModule
from tests.conftest import tiny_config
from tests.test_model import all_patterns, random_batch


def test_every_encoder_and_the_fusion_run_through_their_module_call():
    """`Module.compile` replaces `__call__` only: a module whose work is called another way (an
    `encode` method called directly) would silently stay eager."""
    config = tiny_config()
    module = SCALEModule(config).eval()
    called = set()
    for name, encoder in module.model.encoders.items():
        encoder.register_forward_hook(lambda *_, name=name: called.add(name))
    module.model.fusion.register_forward_hook(lambda *_: called.add("fusion"))
    for present in (all_patterns(), torch.ones(4, len(config.modalities), dtype=torch.bool)):  # packed, then whole
        called.clear()
        module.model(random_batch(config, present), returns="losses")
        assert called == {*config.modalities, "fusion"}


@pytest.mark.slow
def test_compiled_model_gives_the_eager_losses_and_gradients():
    """Two batches of different sizes and missing patterns (packed buckets of other lengths: a
    recompile with dynamic shapes), eval mode (dropout would draw differently when compiled)."""
    config = tiny_config()
    torch.manual_seed(0)
    eager = SCALEModule(config).eval()
    torch.manual_seed(0)
    compiled = SCALEModule(config, compile=True).eval()
    compiled.configure_model()
    assert all(getattr(m, "_compiled_call_impl", None) is not None
               for m in (*compiled.model.encoders.values(), compiled.model.fusion))  # fmt: skip
    for seed, rows in ((1, slice(None)), (2, slice(0, 20))):
        torch.manual_seed(seed)
        batch = random_batch(config, all_patterns()[rows])
        losses = [m.model(batch, returns="losses")["loss"] for m in (eager, compiled)]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for loss in losses:
            loss.backward()
    expected = dict(eager.model.named_parameters())
    scale = max(p.grad.abs().max() for p in expected.values() if p.grad is not None)
    for name, parameter in compiled.model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(parameter.grad, expected[name].grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
