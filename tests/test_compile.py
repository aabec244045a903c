"""`SCALEModule(compile=True)` (`--model.compile true`): torch.compile reaches every encoder and the
fusion, and computes what eager mode computes."""

from __future__ import annotations

import pytest
import torch

from scale.module import SCALEModule
from tests.conftest import tiny_config
from tests.test_model import all_patterns, random_batch


def test_compile_reaches_every_encoder_and_the_fusion():
    """The encoders' work is `encode`, called directly: `Module.compile` (which replaces only
    `__call__`) would have left them eager, as it once did."""
    config = tiny_config()
    module = SCALEModule(config, compile=True)
    module.configure_model()
    for name, encoder in module.model.encoders.items():
        original = getattr(encoder.encode, "_torchdynamo_orig_callable", None)
        assert original is not None and original.__func__ is type(encoder).encode, name
    assert module.model.fusion._compiled_call_impl is not None


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
