"""Contrastive loss and harmonization weights against plain reference computations."""

from __future__ import annotations

import math
import os
from itertools import combinations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from scale.harmonization import harmonization_weights
from scale.losses import contrastive_loss


def reference_loss(features, present, weights, temperature, query_loss):
    """Loop by loop over pairs, directions and valid queries (absent keys and queries excluded):
    `query_loss(scores, own)` turns one query's scores {key index: weighted score} into its loss;
    mean over a pair's valid queries, both directions averaged, then the pairs."""
    names = list(features)
    pair_losses = []
    for (i, a), (j, b) in combinations(enumerate(names), 2):
        valid = [n for n in range(len(present[a])) if present[a][n] and present[b][n]]
        if not valid:
            continue
        directions = []
        for (qi, q), (ki, k) in (((i, a), (j, b)), ((j, b), (i, a))):
            total = 0.0
            for n in valid:
                w = 1.0 if weights is None else float(weights[n, qi, ki])
                scores = {c: w * float(features[q][n] @ features[k][c]) / temperature
                          for c in range(len(present[k])) if present[k][c]}  # fmt: skip
                total += query_loss(scores, n)
            directions.append(total / len(valid))
        pair_losses.append(sum(directions) / 2)
    return sum(pair_losses) / len(pair_losses)


def reference_contrastive(features, present, weights, temperature):
    """InfoNCE: -log softmax of the query's own key."""
    def infonce(scores, own):
        return math.log(sum(math.exp(s) for s in scores.values())) - scores[own]

    return reference_loss(features, present, weights, temperature, infonce)


def make_case(seed=0, batch=6, names=("text", "image", "audio")):
    torch.manual_seed(seed)
    features = {m: F.normalize(torch.randn(batch, 8), dim=-1) for m in names}
    present = {m: torch.rand(batch) > 0.3 for m in names}
    present[names[0]][0] = present[names[1]][0] = True  # at least one valid pair
    return features, present


@pytest.mark.parametrize("weighted", [False, True])
def test_contrastive_matches_reference(weighted):
    features, present = make_case()
    weights = torch.rand(6, 3, 3) + 0.5 if weighted else None
    loss, per_pair, _ = contrastive_loss(features, present, weights, temperature=0.07)
    expected = reference_contrastive(features, present, weights, 0.07)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def reference_siglip(features, present, weights, temperature, bias):
    """Pairwise sigmoid: -log sigmoid(+x) on the query's own key, -log sigmoid(-x) on every other
    present key, x = score + bias."""
    def siglip(scores, own):
        return sum(math.log1p(math.exp(-(x + bias) if c == own else x + bias)) for c, x in scores.items())

    return reference_loss(features, present, weights, temperature, siglip)


def test_siglip_matches_reference():
    features, present = make_case(seed=3)
    weights = torch.rand(6, 3, 3) + 0.5
    loss, *_ = contrastive_loss(features, present, weights, 0.1, objective="siglip", bias=torch.tensor(-3.0))
    assert loss.item() == pytest.approx(reference_siglip(features, present, weights, 0.1, -3.0), rel=1e-5)


def _unchunked(features, present, weights, temperature, pair_weighting, objective, bias):
    """The loss written with plain autograd over the full logits: the reference for the gradient."""
    names = list(features)
    pair_losses = []
    for (i, a), (j, b) in combinations(enumerate(names), 2):
        valid = present[a] & present[b]
        if not valid.any():
            continue
        directions = []
        for (qi, q), (ki, k) in (((i, a), (j, b)), ((j, b), (i, a))):
            w = weights[:, qi, ki]
            logits = features[q] @ features[k].T / temperature
            if pair_weighting == "logit_scale":
                logits = logits * w[:, None]
            own = torch.eye(len(valid), dtype=torch.bool)
            if objective == "infonce":
                logits = logits.masked_fill(~present[k][None, :], float("-inf"))
                per_query = torch.logsumexp(logits, 1) - logits.diagonal()
            else:
                signs = own.float() * 2 - 1
                per_query = -(F.logsigmoid(signs * (logits + bias)) * present[k][None, :]).sum(1)
            per_query = torch.where(valid, per_query, 0.0)  # an invalid query's own key may be absent: inf
            if pair_weighting == "loss_weight":
                per_query = per_query * w
            directions.append(per_query.sum() / valid.sum())
        pair_losses.append(sum(directions) / 2)
    return torch.stack(pair_losses).mean()


@pytest.mark.parametrize("objective", ["infonce", "siglip"])
@pytest.mark.parametrize("pair_weighting", ["logit_scale", "loss_weight"])
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_blocks_of_queries_give_the_exact_loss_and_gradient(objective, pair_weighting, chunk):
    """The hand-written backward of `scale/pair_loss.py`, in blocks of 1, 4 or all query rows,
    against autograd on the full logits: gradients of the features, the harmonization weights (not
    detached), a learned temperature and the SigLIP bias."""
    torch.manual_seed(11)
    names = ("text", "image", "video", "audio")
    leaves = {m: torch.randn(10, 8, dtype=torch.float64) for m in names}
    present = {m: torch.rand(10) > 0.3 for m in names}
    present["text"][:3] = present["image"][:3] = True
    weights = (torch.rand(10, 4, 4, dtype=torch.float64) + 0.5).requires_grad_(True)
    log_temperature = torch.tensor(math.log(0.2), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    inputs = [*leaves.values(), weights, log_temperature, bias]
    for leaf in leaves.values():
        leaf.requires_grad_(True)

    def grads(loss_fn):
        features = {m: F.normalize(leaf, dim=-1) for m, leaf in leaves.items()}
        loss = loss_fn(features, present, weights, log_temperature.exp(), pair_weighting, objective, bias)
        found = torch.autograd.grad(loss, inputs, allow_unused=True)  # infonce ignores the bias
        return loss, [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found)]

    def chunked(features, present, weights, temperature, pair_weighting, objective, bias):
        return contrastive_loss(features, present, weights, temperature, pair_weighting, objective, bias, chunk)[0]

    loss, got = grads(chunked)
    expected_loss, expected = grads(_unchunked)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-10)
    for name, a, b in zip([*names, "weights", "temperature", "bias"], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_contrastive_ignores_absent_keys():
    features, present = make_case(seed=1)
    loss, *_ = contrastive_loss(features, present, None, 0.1)
    # Moving an absent sample's features must not change the loss.
    moved = {m: f.clone() for m, f in features.items()}
    absent = ~present["image"]
    assert absent.any()
    moved["image"][absent] = F.normalize(torch.randn(int(absent.sum()), 8), dim=-1)
    moved_loss, *_ = contrastive_loss(moved, present, None, 0.1)
    assert moved_loss.item() == pytest.approx(loss.item(), rel=1e-6)


def test_harmonization_by_hand_three_modalities_one_absent():
    pooled = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [5.0, 5.0]]])
    present = torch.tensor([[True, True, True, False]])
    weights = harmonization_weights(pooled, present)[0]
    S = [[1.0, 0.6, 0.0], [0.6, 1.0, 0.8], [0.0, 0.8, 1.0]]
    expected = []
    for row in S:
        exps = [math.exp(v) for v in row]
        r = [v * e / sum(exps) for v, e in zip(row, exps)]
        norm = math.sqrt(sum(x * x for x in r))
        expected.append([x / norm for x in r] + [0.0])
    expected.append([0.0] * 4)
    torch.testing.assert_close(weights, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_harmonization_one_and_two_modalities():
    pooled = torch.randn(2, 5, 4)
    present = torch.zeros(2, 5, dtype=torch.bool)
    present[0, 2] = True  # one modality: weight 1 on itself, nothing else
    present[1, [0, 3]] = True  # two modalities
    weights = harmonization_weights(pooled, present)
    assert weights[0, 2, 2] == pytest.approx(1.0)
    assert weights[0].sum() == pytest.approx(1.0)
    s = F.cosine_similarity(pooled[1, 0], pooled[1, 3], dim=0).item()
    soft_self, soft_other = math.exp(1) / (math.exp(1) + math.exp(s)), math.exp(s) / (math.exp(1) + math.exp(s))
    r_self, r_other = soft_self, s * soft_other
    norm = math.hypot(r_self, r_other)
    assert weights[1, 0, 0].item() == pytest.approx(r_self / norm, rel=1e-5)
    assert weights[1, 0, 3].item() == pytest.approx(r_other / norm, rel=1e-5)
    assert weights[1][~(present[1][:, None] & present[1][None, :])].abs().sum() == 0


def test_harmonization_uniform_and_absent_nan_safe():
    pooled = torch.randn(3, 5, 4)
    present = torch.rand(3, 5) > 0.4
    present[:, 0] = True
    pooled[~present] = float("nan")
    pooled.requires_grad_(True)
    uniform = harmonization_weights(pooled, present, mode="uniform")
    assert torch.equal(uniform, (present[:, :, None] & present[:, None, :]).float())
    # NaN in absent rows must not reach the weights or the gradient (the model zeroes absent
    # inputs upstream; this checks the weights alone are safe too once those rows are finite).
    clean = torch.where(present[..., None], pooled, torch.zeros(()))
    weights = harmonization_weights(clean, present)
    weights.sum().backward()
    assert torch.isfinite(weights).all() and torch.isfinite(pooled.grad).all()


def _ddp_worker(rank, world, port, features, present, weights, objective, chunk, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    local = slice(rank * 4, (rank + 1) * 4)
    feats = {m: f[local].clone().requires_grad_(True) for m, f in features.items()}
    bias = torch.tensor(-2.0, requires_grad=True)
    loss, *_ = contrastive_loss(feats, {m: p[local] for m, p in present.items()}, weights[local], 0.07,
                               objective=objective, bias=bias, chunk_size=chunk)  # fmt: skip
    loss.backward()
    # DDP averages gradients over ranks: emulate that reduction on the input gradients.
    grads = {m: f.grad for m, f in feats.items()}
    torch.save({"loss": loss.detach(), "grads": grads, "bias": bias.grad}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("objective,chunk", [("infonce", None), ("infonce", 3), ("siglip", 2)])
def test_contrastive_is_exact_under_two_processes(tmp_path, objective, chunk):
    """Loss and gradients on 2 gloo processes (gather with grad, global normalisation) equal one
    process on the concatenated batch, even with a different number of valid queries per rank, for
    both objectives and in blocks of queries."""
    torch.manual_seed(7)
    names = ("text", "image", "video")
    features = {m: F.normalize(torch.randn(8, 6), dim=-1) for m in names}
    present = {m: torch.rand(8) > 0.25 for m in names}
    present["text"][:2] = present["image"][:2] = True
    weights = torch.rand(8, 3, 3) + 0.5
    port = 29500 + os.getpid() % 1000 + (chunk or 0) * 7
    mp.spawn(_ddp_worker, args=(2, port, features, present, weights, objective, chunk, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    single = {m: f.clone().requires_grad_(True) for m, f in features.items()}
    bias = torch.tensor(-2.0, requires_grad=True)
    loss, *_ = contrastive_loss(single, present, weights, 0.07, objective=objective, bias=bias)
    loss.backward()
    if objective == "siglip":  # the bias is a replicated parameter: DDP averages its gradient
        assert (sum(r["bias"] for r in ranks) / 2).item() == pytest.approx(bias.grad.item(), rel=1e-4)
    mean_loss = sum(r["loss"] for r in ranks) / 2
    assert mean_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for m in names:
        # Rank r owns rows 4r..4r+3 (cross-rank terms arrive through all_gather's backward);
        # DDP divides the summed gradient by the world size.
        distributed = torch.cat([ranks[r]["grads"][m] for r in range(2)]) / 2
        torch.testing.assert_close(distributed, single[m].grad, rtol=1e-4, atol=1e-6)


def test_rescale_to_unit_mean_over_present_entries_only():
    from scale.harmonization import pair_mask, rescale_to_unit_mean

    weights = torch.rand(4, 5, 5)
    present = torch.rand(4, 5) > 0.3
    present[:, :2] = True
    mask = pair_mask(present, diagonal=False)
    rescaled = rescale_to_unit_mean(weights, mask)
    assert rescaled[mask].mean().item() == pytest.approx(1.0, rel=1e-6)
    # The ratios between entries are kept: only the overall scale changes.
    torch.testing.assert_close(rescaled / rescaled[mask][0], weights / weights[mask][0])


@pytest.mark.parametrize("detach", [True, False])
def test_detach_controls_gradient_through_the_weights(detach):
    """detach=True: the gradient of the model's contrastive loss equals that of the same loss with G
    held constant. detach=False (official): G carries gradient too, so the two differ."""
    from scale.model import SCALE
    from tests.conftest import tiny_config
    from tests.test_model import all_patterns, random_batch

    torch.manual_seed(0)
    config = tiny_config()
    config.harmonization.detach = detach
    config.harmonization.rescale = False
    model = SCALE(config)
    output = model(random_batch(config, all_patterns()))
    pooled = list(output.pooled.values())
    model_grads = torch.autograd.grad(model.losses(output)["contrastive"], pooled, retain_graph=True)

    features = {m: F.normalize(model.projections[m](output.pooled[m]).float(), dim=-1) for m in model.modalities}
    present = torch.stack([output.present[m] for m in model.modalities], dim=1)
    constant_weights = harmonization_weights(torch.stack(list(features.values()), dim=1), present).detach()
    reference, *_ = contrastive_loss(features, output.present, constant_weights, model.temperature)
    reference_grads = torch.autograd.grad(reference, pooled)
    same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(model_grads, reference_grads))
    assert same == detach


def test_learned_harmonization_starts_uniform_and_respects_absence():
    learned = torch.zeros(5, 5, requires_grad=True)
    present = torch.tensor([[True, True, False, True, False], [False, False, True, False, False]])
    weights = harmonization_weights(torch.randn(2, 5, 4), present, mode="learned", learned=learned)
    assert torch.equal(weights, (present[:, :, None] & present[:, None, :]).float())
    # A larger logit moves weight to that pair, keeps the row's total, and stays zero where absent.
    with torch.no_grad():
        learned[0, 1] = 2.0
    weights = harmonization_weights(torch.randn(2, 5, 4), present, mode="learned", learned=learned)
    row = weights[0, 0]
    e = math.exp(2.0)
    assert row[1].item() == pytest.approx(3 * e / (e + 2), rel=1e-5)
    assert row[0].item() == pytest.approx(3 / (e + 2), rel=1e-5)
    assert row.sum().item() == pytest.approx(3.0, rel=1e-5) and row[2] == 0 and row[4] == 0
    weights.sum().backward()
    assert torch.isfinite(learned.grad).all()


def test_learned_matrix_is_trained_by_the_losses():
    from scale.model import SCALE
    from tests.conftest import tiny_config
    from tests.test_model import all_patterns, random_batch

    config = tiny_config()
    config.harmonization.mode = "learned"
    model = SCALE(config)
    losses = model.losses(model(random_batch(config, all_patterns()), masked_modeling=True))
    losses["loss"].backward()
    assert model.harmonization_matrix.grad is not None and model.harmonization_matrix.grad.abs().sum() > 0
    assert "harmonization/text-image" in losses


def test_siglip_model_trains_its_bias_and_matches_infonce_projections():
    """`contrastive.objective: siglip` builds the learned offset, the loss reaches it, and the model
    has the same parameters otherwise (an export of either loads the same way)."""
    from scale.model import SCALE
    from tests.conftest import tiny_config
    from tests.test_model import all_patterns, random_batch

    config = tiny_config()
    config.contrastive.objective = "siglip"
    model = SCALE(config)
    losses = model.losses(model(random_batch(config, all_patterns()), masked_modeling=True))
    losses["contrastive"].backward()
    assert model.logit_bias.item() == config.contrastive.siglip_bias
    assert model.logit_bias.grad is not None and model.logit_bias.grad.abs() > 0
    infonce = SCALE(tiny_config())
    assert set(dict(model.named_parameters())) - set(dict(infonce.named_parameters())) == {"logit_bias"}


class _NoHostReads(TorchDispatchMode):
    """Fails on every op that reads a tensor's values on the host: a scalar read (`.item()`,
    `bool(t)`, `if t`), `nonzero`, and selection by a boolean mask (its size is data-dependent)."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::nonzero_static"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.SYNCING:
            raise AssertionError(f"host read: {name}")
        if name == "aten::index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        ):
            raise AssertionError("host read: boolean-mask indexing")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("objective", ["infonce", "siglip"])
def test_contrastive_loss_reads_nothing_on_the_host(objective):
    """Forward and backward of the loss with absent modalities, a pair without any valid query and
    harmonization weights: no op reads a value on the host (each would be a GPU sync), and the loss
    still equals the reference's."""
    features, present = make_case(seed=5, names=("text", "image", "video", "audio"))
    present["audio"][:] = False  # three pairs without a query anywhere: left out of the mean by their count
    present["video"][0] = False  # a query whose own key is absent: masked, not selected
    leaves = {m: f.clone().requires_grad_(True) for m, f in features.items()}
    weights = (torch.rand(6, 4, 4) + 0.5).requires_grad_(True)
    bias = torch.tensor(-2.0, requires_grad=True)
    with _NoHostReads():
        loss, per_pair, queries = contrastive_loss(leaves, present, weights, 0.07, objective=objective, bias=bias,
                                                   chunk_size=4)  # fmt: skip
        loss.backward()
    assert queries["image-audio"] == 0 and per_pair["image-audio"] == 0
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves.values()) and torch.isfinite(weights.grad).all()
    assert loss.item() == pytest.approx(
        (reference_contrastive if objective == "infonce" else reference_siglip)(
            features, present, weights.detach(), 0.07, *([] if objective == "infonce" else [-2.0])), rel=1e-5)


@pytest.mark.parametrize("objective", ["infonce", "siglip"])
def test_nan_in_absent_rows_reaches_neither_loss_nor_gradient(objective):
    features, present = make_case(seed=2)
    poisoned = {m: torch.where(present[m][:, None], f, float("nan")) for m, f in features.items()}
    results = []
    for case in (features, poisoned):
        leaves = {m: f.clone().requires_grad_(True) for m, f in case.items()}
        loss, *_ = contrastive_loss(leaves, present, torch.rand(6, 3, 3, generator=torch.Generator().manual_seed(0)) + 0.5,
                                    0.07, objective=objective, bias=torch.tensor(-2.0))  # fmt: skip
        loss.backward()
        results.append((loss, {m: leaf.grad for m, leaf in leaves.items()}))
    (clean, clean_grads), (dirty, dirty_grads) = results
    assert torch.isfinite(dirty) and dirty == clean
    for m in features:
        assert torch.isfinite(dirty_grads[m]).all() and torch.equal(dirty_grads[m], clean_grads[m]), m
