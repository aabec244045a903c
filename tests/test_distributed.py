"""The model's contrastive objective is exact under data parallelism (real gloo processes)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scale.model import SCALE
from tests.conftest import tiny_config
from tests.test_model import random_batch

BATCH = 8


def make_inputs():
    torch.manual_seed(11)
    present = torch.rand(BATCH, 5) > 0.3
    present[:, 0] = True
    present[:3, 2] = False  # rank 0 holds fewer images than rank 1: global normalisation matters
    return random_batch(tiny_config(), present)


def build_model(mode: str, micro_batches: int = 1) -> SCALE:
    torch.manual_seed(0)
    config = tiny_config(micro_batches=micro_batches)
    config.harmonization.mode = mode
    model = SCALE(config)
    return model.eval()  # no dropout: both sides compute the same function


def take(batch: dict, rows: slice) -> dict:
    return {m: {k: v[rows] for k, v in entry.items()} for m, entry in batch.items()}


def _worker(rank: int, world: int, port: int, mode: str, out: str, first_rows: int, micro_batches: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = build_model(mode, micro_batches)
    rows = slice(0, first_rows) if rank == 0 else slice(first_rows, BATCH)  # rank 0 holds `first_rows`
    losses = model(take(make_inputs(), rows), returns="losses")
    losses["contrastive"].backward()
    grads = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)  # what DDP does: sum, then divide by the world size
            grads[name] = parameter.grad / world
    loss = losses["contrastive"].detach().clone()
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / world, "grads": grads}, os.path.join(out, "ddp.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, first_rows, micro_batches",
    # 3 + 5 rows: the unequal local batches at the end of an exact epoch (datamodules/streams.py);
    # micro_batches: each rank's encoders in pieces, the loss still over the global batch.
    [("per_sample", BATCH // 2, 1), ("uniform", BATCH // 2, 1), ("per_sample", 3, 1), ("per_sample", 3, 2)],
)
def test_two_process_model_gradients_equal_one_process(tmp_path, mode, first_rows, micro_batches):
    port = 29000 + (os.getpid() + len(mode) + 7 * first_rows + 100 * micro_batches) % 1000
    mp.spawn(_worker, args=(2, port, mode, str(tmp_path), first_rows, micro_batches), nprocs=2, join=True)
    distributed = torch.load(tmp_path / "ddp.pt", weights_only=True)

    model = build_model(mode)  # one process, the whole batch in one piece
    losses = model.losses(model(make_inputs()))
    losses["contrastive"].backward()
    assert distributed["loss"].item() == pytest.approx(losses["contrastive"].item(), rel=1e-5)
    compared = 0
    for name, parameter in model.named_parameters():
        if parameter.grad is not None and parameter.grad.abs().sum() > 0:
            # float32 sums in another order on two processes: an absolute tolerance scaled to the
            # tensor (a wrong gather would be off by the gradient itself, not by 1e-6 of it).
            atol = max(1e-7, 2e-6 * parameter.grad.abs().max().item())
            torch.testing.assert_close(distributed["grads"][name], parameter.grad, rtol=2e-4, atol=atol, msg=name)
            compared += 1
    assert compared > 20
