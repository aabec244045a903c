"""K3M's knowledge pieces on the table: link prediction (LPM) and structure aggregation.

Each test would fail if the mechanism were wrong, not only if it crashed: masks are checked span by
span, the LPM loss against a loop-by-loop reference (a duplicate value included) and against one
process on 2 gloo processes, structure pooling against its formula, and a short training run must
actually learn to link values.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from scale.config import MODALITIES
from scale.model import SCALE
from scale.modalities.base import Masked
from scale.modalities.table.knowledge import LINK_TEMPERATURE, TableMasked, link_prediction_loss, packed_spans
from scale.modalities.text.stems import BertModality
from tests.conftest import tiny_config
from tests.test_model import all_patterns, random_batch

TABLE = MODALITIES.index("table")


def make_model(link: bool = False, structure: bool = False, modalities=("text", "table"), seed: int = 0) -> SCALE:
    config = tiny_config(modalities=list(modalities))
    config.table.link_prediction = link
    config.table.structure_pooling = structure
    torch.manual_seed(seed)
    return SCALE(config)


def table_inputs(rows: list, special: dict[str, int], max_tokens: int = 32, present=None) -> dict:
    """`[CLS] k1 v1 k2 v2 ... [SEP] [PAD]...` as decode.py builds it; rows: per sample a list of
    (key ids, value ids), None for an absent sample (zeros and -1, as collation gives)."""
    B = len(rows)
    ids = torch.full((B, max_tokens), special["pad"])
    attention = torch.zeros(B, max_tokens, dtype=torch.long)
    entity = torch.full((B, max_tokens), -1)
    role = torch.full((B, max_tokens), -1)
    for b, pairs in enumerate(rows):
        if pairs is None:
            ids[b] = 0
            continue
        seq, ent, rol = [special["cls"]], [-1], [-1]
        for j, (key, value) in enumerate(pairs):
            seq += key + value
            ent += [j] * (len(key) + len(value))
            rol += [0] * len(key) + [1] * len(value)
        seq, ent, rol = seq + [special["sep"]], ent + [-1], rol + [-1]
        n = len(seq)
        ids[b, :n], attention[b, :n] = torch.tensor(seq), 1
        entity[b, :n], role[b, :n] = torch.tensor(ent), torch.tensor(rol)
    present = torch.tensor([r is not None for r in rows]) if present is None else present
    return {"input_ids": ids, "attention_mask": attention, "entity_index": entity, "entity_role": role,
            "present": present}  # fmt: skip


def random_rows(generator: torch.Generator, samples: int, max_pairs: int = 4) -> list:
    rows = []
    for b in range(samples):
        if b % 7 == 5:
            rows.append(None)  # absent
            continue
        pairs = []
        for _ in range(int(torch.randint(0, max_pairs + 1, (1,), generator=generator))):
            lengths = torch.randint(1, 4, (2,), generator=generator).tolist()
            key = torch.randint(2000, 2100, (lengths[0],), generator=generator).tolist()
            value = torch.randint(3000, 3100, (lengths[1],), generator=generator).tolist()
            pairs.append((key, value))
        rows.append(pairs)
    return rows


# ---- switches ---------------------------------------------------------------------------------


def test_both_options_off_build_exactly_the_plain_table_encoder():
    table = make_model().encoders["table"]
    assert table.structure is None and table.link is None
    names = {n for n, _ in table.named_parameters()}
    assert names == {f"tower.{n}" for n, _ in table.tower.named_parameters()}
    assert set(table.state_dict()) == {f"tower.{n}" for n in table.tower.state_dict()}
    inputs = table_inputs([[([2000], [3000])]], table.special_ids)
    masked = table.mask(table.sanitize(inputs, inputs["present"]), inputs["present"])
    assert type(masked) is Masked
    assert table.extra_losses(torch.zeros(1, 32, 32), masked, torch.ones(1)) == {}


@pytest.mark.parametrize("link,structure,prefix", [(True, False, "link."), (False, True, "structure.")])
def test_each_option_adds_only_its_own_module(link, structure, prefix):
    plain = {n for n, _ in make_model().encoders["table"].named_parameters()}
    extra = {n for n, _ in make_model(link, structure).encoders["table"].named_parameters()} - plain
    assert extra and all(n.startswith(prefix) for n in extra)


# ---- LPM masking ------------------------------------------------------------------------------


@pytest.mark.parametrize("mem", [False, True])
def test_lpm_masks_exactly_one_whole_value_span_per_sample_with_pairs(mem):
    model = make_model(link=True)
    model.config.table.masked_modeling = mem
    table = model.encoders["table"]
    mask_id = table.special_ids["mask"]
    rows = random_rows(torch.Generator().manual_seed(0), 40)
    inputs = table_inputs(rows, table.special_ids)
    present = inputs["present"]
    clean = table.sanitize(inputs, present)
    for seed in range(10):  # many draws, so MEM also lands on the LPM triple
        torch.manual_seed(seed)
        masked = table.mask(clean, present)
        assert isinstance(masked, TableMasked)
        assert torch.equal(masked.original_ids, clean["input_ids"])
        ids, entity, role = clean["input_ids"], clean["entity_index"], clean["entity_role"]
        hidden = masked.inputs["input_ids"] == mask_id
        for b, pairs in enumerate(rows):
            link = int(masked.link_pair[b])
            if not pairs:  # absent, or no pair at all
                assert link == -1 and not hidden[b].any()
                continue
            assert 0 <= link < len(pairs)
            value = (entity[b] == link) & (role[b] == 1)
            key = (entity[b] == link) & (role[b] == 0)
            assert hidden[b][value].all(), "the LPM value span is not wholly masked"
            assert not hidden[b][key].any(), "the key of the LPM triple must stay visible"
            if not mem:
                assert torch.equal(hidden[b], value), "LPM alone must mask exactly the chosen value"
                assert torch.equal(masked.inputs["input_ids"][b][~value], ids[b][~value])
        if mem:  # MEM's scored positions are whole spans, and the LPM value is never a partial one
            assert torch.equal(masked.targets, ids[masked.positions])
            assert (hidden | ~masked.positions).all()


# ---- LPM loss ---------------------------------------------------------------------------------


def _reference_lpm(link_module, word_embeddings, fused, inputs, link_pair, weight, exclude_duplicates=True):
    """Loop-by-loop InfoNCE: item + property -> query, mean word embedding -> candidate."""
    ids, entity, role = inputs["input_ids"], inputs["entity_index"], inputs["entity_role"]
    queries, values, strings = {}, {}, {}
    for b in range(ids.shape[0]):
        j = int(link_pair[b])
        if j < 0:
            continue
        key = [t for t in range(ids.shape[1]) if entity[b, t] == j and role[b, t] == 0]
        val = [t for t in range(ids.shape[1]) if entity[b, t] == j and role[b, t] == 1]
        prop = fused[b, key].mean(0)
        queries[b] = F.normalize(link_module.query(torch.cat([fused[b, 0], prop])), dim=0)
        values[b] = F.normalize(link_module.value(word_embeddings(ids[b, val]).mean(0)), dim=0)
        strings[b] = ids[b, val].tolist()
    total = 0.0
    for i, q in queries.items():
        others = [j for j in values if j == i or strings[j] != strings[i] or not exclude_duplicates]
        logits = torch.stack([q @ values[j] for j in others]) / LINK_TEMPERATURE
        total = total - weight[i] * torch.log_softmax(logits, 0)[others.index(i)]
    return total / len(queries)


def test_lpm_loss_matches_loop_reference_with_a_duplicate_value_excluded():
    model = make_model(link=True)
    table = model.encoders["table"]
    rows = [
        [([2000], [3000, 3001]), ([2001], [3002])],  # LPM on pair 0: value "3000 3001"
        [([2002, 2003], [3005])],
        [([2001], [3002]), ([2004], [3000, 3001])],  # pair 1: the same value string as sample 0
        [([2000], [3000])],  # a prefix of sample 0's value: a different value, a real negative
        [([2000], [3007])],  # has pairs but no LPM pick: neither query nor candidate
        None,  # absent
    ]
    inputs = table_inputs(rows, table.special_ids)
    link_pair = torch.tensor([0, 0, 1, 0, -1, -1])
    masked = TableMasked(inputs=inputs, positions=torch.zeros(6, 32, dtype=torch.bool),
                         targets=torch.zeros(0, dtype=torch.long), original_ids=inputs["input_ids"],
                         link_pair=link_pair)  # fmt: skip
    torch.manual_seed(1)
    fused = torch.randn(6, 32, 32, requires_grad=True)
    weight = torch.rand(6) + 0.5
    loss = table.extra_losses(fused, masked, weight)["link_prediction"]
    words = table.tower.bert.embeddings.word_embeddings
    reference = _reference_lpm(table.link, words, fused, inputs, link_pair, weight)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)

    # The duplicate is really there and really matters: scored as a negative, the loss differs.
    value_span = (inputs["entity_index"] == link_pair[:, None]) & (inputs["entity_role"] == 1)
    packed = packed_spans(inputs["input_ids"], value_span)
    assert torch.equal(packed[0], packed[2]) and not torch.equal(packed[0], packed[3])
    with_duplicate = _reference_lpm(table.link, words, fused, inputs, link_pair, weight, exclude_duplicates=False)
    assert abs(with_duplicate.item() - loss.item()) > 1e-3

    loss.backward()
    assert fused.grad[4].abs().sum() == 0 and fused.grad[5].abs().sum() == 0, "samples without a query got gradient"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in table.link.parameters())
    assert words.weight.grad[3000].abs().sum() > 0, "value embeddings come from the word embeddings"


def test_lpm_without_any_query_is_a_connected_zero():
    model = make_model(link=True)
    table = model.encoders["table"]
    inputs = table_inputs([None, [], [([2000], [3000])]], table.special_ids)
    inputs["present"][2] = False
    clean = table.sanitize(inputs, inputs["present"])
    masked = table.mask(clean, inputs["present"])
    assert (masked.link_pair == -1).all()
    loss = table.extra_losses(torch.randn(3, 32, 32), masked, torch.ones(3))["link_prediction"]
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None for p in table.link.parameters())


def _ddp_worker(rank, world, port, queries, candidates, value_ids, valid, weight, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    local = slice(rank * 4, (rank + 1) * 4)
    q = queries[local].clone().requires_grad_(True)
    c = candidates[local].clone().requires_grad_(True)
    loss = link_prediction_loss(q, c, value_ids[local], valid[local], weight[local])
    loss.backward()
    torch.save({"loss": loss.detach(), "q": q.grad, "c": c.grad}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_lpm_loss_is_exact_under_two_processes(tmp_path):
    """2 gloo processes (candidates gathered with grad, duplicates found across ranks, global
    normalisation) equal one process on the concatenated batch, with uneven query counts."""
    torch.manual_seed(7)
    queries = F.normalize(torch.randn(8, 6), dim=-1)
    candidates = F.normalize(torch.randn(8, 6), dim=-1)
    value_ids = torch.randint(3000, 3004, (8, 5))
    value_ids[:, 2:] = -1
    value_ids[6] = value_ids[1]  # a duplicate on the other rank
    valid = torch.tensor([True, True, False, False, True, True, True, True])
    weight = torch.rand(8) + 0.5
    port = 29500 + (os.getpid() + 500) % 1000
    args = (2, port, queries, candidates, value_ids, valid, weight, str(tmp_path))
    mp.spawn(_ddp_worker, args=args, nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    q, c = queries.clone().requires_grad_(True), candidates.clone().requires_grad_(True)
    loss = link_prediction_loss(q, c, value_ids, valid, weight)
    loss.backward()
    assert (ranks[0]["loss"] + ranks[1]["loss"]).item() / 2 == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(torch.cat([r["q"] for r in ranks]) / 2, q.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["c"] for r in ranks]) / 2, c.grad, rtol=1e-4, atol=1e-6)


# ---- in the whole model -----------------------------------------------------------------------


def test_model_loss_includes_lpm_finite_on_every_missing_pattern():
    model = make_model(link=True, structure=True, modalities=MODALITIES)
    torch.manual_seed(3)
    present = all_patterns()
    batch = random_batch(model.config, present, fill_absent=float("nan"))
    model.zero_grad(set_to_none=True)
    output = model(batch, masked_modeling=True)
    link = output.masked["table"].link_pair
    assert (link[present[:, TABLE]] >= 0).all() and (link[~present[:, TABLE]] == -1).all()
    losses = model.losses(output)
    assert "table/link_prediction" in losses and losses["table/link_prediction"] > 0
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    # The LPM query MLP is used by nothing else: a gradient there means the total includes it.
    assert model.encoders["table"].link.query[0].weight.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    assert all(torch.isfinite(e).all() for e in model.embed(batch).values())


def test_absent_table_content_never_reaches_outputs_or_losses():
    """Garbage in absent tables (ids, masks, entity layout) changes no loss and no embedding."""
    model = make_model(link=True, structure=True, modalities=MODALITIES)
    present = all_patterns()
    batch = random_batch(model.config, present, fill_absent=float("nan"))
    results = []
    for garbage in range(2):
        table = batch["table"]
        absent = ~present[:, TABLE]
        generator = torch.Generator().manual_seed(garbage)
        table["input_ids"][absent] = torch.randint(0, 30000, table["input_ids"][absent].shape, generator=generator)
        table["entity_index"][absent] = torch.randint(-1, 8, table["entity_index"][absent].shape, generator=generator)
        table["entity_role"][absent] = torch.randint(-1, 2, table["entity_role"][absent].shape, generator=generator)
        torch.manual_seed(0)
        model.train()
        losses = model.losses(model(batch, masked_modeling=True))
        model.eval()
        results.append((losses, model.embed(batch)))
    (losses_a, embed_a), (losses_b, embed_b) = results
    for name in losses_a:
        torch.testing.assert_close(losses_a[name], losses_b[name], msg=name)
    for name in embed_a:
        torch.testing.assert_close(embed_a[name], embed_b[name], msg=name)


def test_every_parameter_gets_a_gradient_when_no_sample_has_a_table():
    """DDP without find_unused_parameters: LPM and structure weights need a gradient every step."""
    model = make_model(link=True, structure=True, modalities=MODALITIES)
    present = torch.ones(4, 5, dtype=torch.bool)
    present[:, TABLE] = False
    losses = model.losses(model(random_batch(model.config, present), masked_modeling=True))
    assert losses["table/link_prediction"].item() == 0.0
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


def test_link_prediction_off_adds_no_loss():
    model = make_model(link=False)
    losses = model.losses(model(random_batch(model.config, torch.ones(4, 5, dtype=torch.bool)), masked_modeling=True))
    assert not any("link" in name for name in losses)


# ---- structure aggregation --------------------------------------------------------------------


def _structure(model, inputs):
    table = model.encoders["table"]
    clean = table.sanitize(inputs, inputs["present"])
    tokens = BertModality.encode(table, clean).tokens  # before aggregation
    pooled, alpha = table.structure_pool(tokens, clean)
    return clean, tokens, pooled, alpha, table.encode(clean).tokens[:, 0]


def test_structure_pooling_matches_its_formula_and_ignores_padding_pairs():
    model = make_model(structure=True)
    model.eval()
    table = model.encoders["table"]
    rows = [[([2000], [3000, 3001]), ([2001, 2002], [3002])], [([2003], [3003])], [], None,
            [([2000 + j], [3000 + j]) for j in range(8)]]  # fmt: skip
    clean, tokens, pooled, alpha, encoded = _structure(model, table_inputs(rows, table.special_ids))
    torch.testing.assert_close(encoded, pooled)
    module = table.structure
    for b, pairs in enumerate(rows):
        n = len(pairs or [])
        assert (alpha[b, n:] == 0).all(), "padding pairs got attention"
        assert alpha[b].sum().item() == pytest.approx(1.0 if n else 0.0, abs=1e-6)
        c = tokens[b, 0]
        expected = c + module.out.bias
        if n:
            triples = torch.stack([tokens[b][clean["entity_index"][b] == j].mean(0) for j in range(n)])
            scores = (module.query(c) @ module.key(triples).T) / math.sqrt(c.shape[0])
            a = torch.softmax(scores, 0)
            torch.testing.assert_close(alpha[b, :n], a)
            expected = c + module.out(a @ triples)
        torch.testing.assert_close(pooled[b], expected, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(pooled).all()


def test_structure_pooling_moves_with_pairs_not_with_padding():
    model = make_model(structure=True)
    model.eval()
    table = model.encoders["table"]
    rows = [[([2000], [3000, 3001]), ([2001], [3002])]] * 2 + [None]
    inputs = table_inputs(rows, table.special_ids)
    base = _structure(model, inputs)[2]

    padded = {k: v.clone() for k, v in inputs.items()}
    padded["input_ids"][:2, 10:] = torch.randint(1000, 5000, (2, 22))  # padding tokens only
    padded["input_ids"][2] = torch.randint(1000, 5000, (32,))  # the absent sample
    padded["entity_index"][2] = 0
    torch.testing.assert_close(_structure(model, padded)[2], base)

    changed = {k: v.clone() for k, v in inputs.items()}
    changed["input_ids"][0, 5] = 3050  # sample 0's second value
    after = _structure(model, changed)[2]
    assert not torch.allclose(after[0], base[0]) and torch.equal(after[1], base[1])

    # The aggregation term itself moves with the pairs, not only the mean it is added to.
    module = table.structure
    _, tokens, pooled, _, _ = _structure(model, inputs)
    _, tokens2, pooled2, _, _ = _structure(model, changed)
    assert not torch.allclose(pooled[0] - tokens[0, 0], pooled2[0] - tokens2[0, 0])
    torch.testing.assert_close(pooled[2], tokens[2, 0] + module.out.bias)  # absent: c + W(0)


# ---- learning ---------------------------------------------------------------------------------


def test_short_training_run_learns_to_link_values():
    """Each product's value is fixed by one word of its title and by nothing else in the table, so
    the LPM loss can only fall below the uninformed level (uniform over the candidates left after
    removing duplicates) if the fused item representation carries the title into the query."""
    torch.manual_seed(0)
    model = make_model(link=True, modalities=("text", "table"))
    # A one-word title would be the token MLM masks on every step (at least one per row): off here.
    model.config.text.masked_modeling = False
    special = model.encoders["table"].special_ids
    B, options = 32, 8
    choice = torch.randint(0, options, (B,), generator=torch.Generator().manual_seed(0))
    batch = {"table": table_inputs([[([2000], [3000 + int(c)])] for c in choice], special)}
    text = torch.full((B, 16), special["pad"])
    text[:, 0], text[:, 1], text[:, 2] = special["cls"], 4000 + choice, special["sep"]
    batch["text"] = {"input_ids": text, "attention_mask": (text != special["pad"]).long(),
                     "present": torch.ones(B, dtype=torch.bool)}  # fmt: skip
    uninformed = sum(math.log(B - int((choice == c).sum()) + 1) for c in choice) / B
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    history = []
    # Tensors this small gain nothing from a second thread, and on a busy 2-core machine the
    # threads' contention made this loop 10x slower (30 ms vs 0.3 s a step).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(100):
            losses = model.losses(model(batch, masked_modeling=True))
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
            history.append(losses["table/link_prediction"].item())
    finally:
        torch.set_num_threads(threads)
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert first == pytest.approx(uninformed, abs=0.1), (first, uninformed)
    assert last < 0.5 * uninformed, (first, last, uninformed)
