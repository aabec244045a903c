"""Tests for scale.metrics: retrieval mAP/precision, linear probe, clustering."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scale.metrics import (
    RETRIEVAL_MEMORY_BUDGET_BYTES,
    ap_at_k,
    clustering_metrics,
    linear_probe_accuracy,
    retrieval_metrics,
)


# --------------------------------------------------------------------------- reference


def reference_retrieval(emb: np.ndarray, labels: np.ndarray, ks, official_ap: bool, gallery=None) -> dict:
    """Brute-force, one query at a time, straight from the AP definitions (`gallery`: the gallery
    side's embeddings of the same items)."""
    x = np.asarray(emb, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    g = x if gallery is None else np.asarray(gallery, dtype=np.float64)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    labels = np.asarray(labels)
    n = len(x)
    aps = {k: [] for k in ks}
    precs = {k: [] for k in ks}
    for q in range(n):
        others = np.array([i for i in range(n) if i != q])
        npos = int(np.sum(labels[others] == labels[q]))
        if npos == 0:
            continue
        sims = g[others] @ x[q]
        order = others[np.argsort(-sims, kind="stable")]  # ties: lower index first
        rel = (labels[order] == labels[q]).astype(float)
        for k in ks:
            hits, s = 0, 0.0
            for i in range(k):
                if rel[i]:
                    hits += 1
                    s += hits / (i + 1)
            denom = hits if official_ap else min(k, npos)
            aps[k].append(s / denom if denom else 0.0)
            precs[k].append(hits / k)
    out = {}
    for k in ks:
        out[f"map@{k}"] = float(np.mean(aps[k])) if aps[k] else 0.0
        out[f"prec@{k}"] = float(np.mean(precs[k])) if precs[k] else 0.0
    out["queries"] = len(aps[ks[0]])
    return out


def assert_same(a: dict, b: dict, tol: float = 1e-9) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=tol), key


def angles(degrees) -> np.ndarray:
    r = np.deg2rad(np.asarray(degrees, dtype=float))
    return np.stack([np.cos(r), np.sin(r)], axis=1)


# --------------------------------------------------------------------------- AP@K by hand


def test_ap_at_k_hand_computed_standard_vs_official():
    # ranking [rel, non, rel], 3 positives in the gallery, K=3
    rel = np.array([[1, 0, 1]], dtype=bool)
    std = ap_at_k(rel, [3], k=3, official_ap=False)
    off = ap_at_k(rel, [3], k=3, official_ap=True)
    assert std[0] == pytest.approx((1 + 2 / 3) / 3)
    assert off[0] == pytest.approx((1 + 2 / 3) / 2)


def test_ap_at_k_edge_cases():
    rel = np.array(
        [
            [0, 0, 0],  # no hits -> 0 in both definitions
            [1, 0, 0],  # one hit at rank 1, 5 positives: standard 1/3, official 1
            [0, 0, 1],  # one positive found at rank 3: 1/3 either way
            [1, 1, 1],  # perfect
        ],
        dtype=bool,
    )
    npos = [2, 5, 1, 3]
    np.testing.assert_allclose(ap_at_k(rel, npos, 3), [0, 1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(ap_at_k(rel, npos, 3, official_ap=True), [0, 1, 1 / 3, 1])
    # K truncates: only the first column counts at K=1
    np.testing.assert_allclose(ap_at_k(rel, npos, 1), [0, 1, 0, 1])


def test_retrieval_hand_computed_end_to_end():
    # Points on the unit circle; label 1 (index 2) is a distractor with no positive.
    #   q0 (0):  10 rel, 25 non, 45 rel   -> [1,0,1], 3 positives: std 5/9,  official 5/6
    #   q1 (10):  0 rel, 25 non, 45 rel   -> [1,0,1]:               std 5/9,  official 5/6
    #   q2 (25):  no positive             -> skipped
    #   q3 (45): 25 non, 70 rel, 10 rel   -> [0,1,1]: (1/2+2/3)     std 7/18, official 7/12
    #   q4 (70): 45 rel, 25 non, 10 rel   -> [1,0,1]:               std 5/9,  official 5/6
    emb = angles([0, 10, 25, 45, 70])
    labels = [0, 0, 1, 0, 0]
    std = retrieval_metrics(emb, labels, ks=(3,))
    off = retrieval_metrics(emb, labels, ks=(3,), official_ap=True)
    assert std["queries"] == off["queries"] == 4
    assert std["map@3"] == pytest.approx((3 * 5 / 9 + 7 / 18) / 4)
    assert off["map@3"] == pytest.approx((3 * 5 / 6 + 7 / 12) / 4)
    assert std["prec@3"] == off["prec@3"] == pytest.approx(2 / 3)


def test_query_never_retrieves_itself():
    # Each point's nearest *other* point has the other label; if the query were not excluded it
    # would retrieve itself (similarity 1) and prec@1 would be 1.
    emb = angles([0, 5, 90, 95])
    labels = ["a", "b", "a", "b"]
    got = retrieval_metrics(emb, labels, ks=(1, 2, 3))
    assert got["prec@1"] == 0.0
    assert got["map@1"] == 0.0
    # 2nd neighbours: q0 -> 90 deg (a, hit), q1 -> 90 deg (a, miss), q2 -> 5 deg (b, miss),
    # q3 -> 5 deg (b, hit): two hits out of 4 * 2 slots.
    assert got["prec@2"] == pytest.approx(0.25)
    assert got["prec@3"] == pytest.approx(1 / 3)
    assert got["queries"] == 4


def test_queries_without_positives_are_skipped():
    emb = angles([0, 10, 90])
    labels = [0, 0, 1]
    got = retrieval_metrics(emb, labels, ks=(1, 2))
    assert got["queries"] == 2
    assert got["map@1"] == 1.0 and got["prec@1"] == 1.0
    assert got["prec@2"] == 0.5
    assert got["map@2"] == 1.0  # one positive, found at rank 1
    # All singletons -> nothing to score.
    none = retrieval_metrics(angles([0, 10, 90]), [0, 1, 2], ks=(1,))
    assert none == {"map@1": 0.0, "prec@1": 0.0, "queries": 0}


def test_ties_broken_by_index():
    # All embeddings identical: every ranking is purely by index (lower first).
    emb = np.tile([[1.0, 0.0, 0.0]], (6, 1))
    labels = [0, 1, 0, 1, 1, 0]
    for official in (False, True):
        got = retrieval_metrics(emb, labels, ks=(1, 2, 4), official_ap=official)
        assert_same(got, reference_retrieval(emb, np.array(labels), [1, 2, 4], official))
    got = retrieval_metrics(emb, labels, ks=(1,))
    # top-1 = lowest other index: q0->1 (miss), q1..q5->0 (hits for q2 and q5 only)
    assert got["prec@1"] == pytest.approx(2 / 6)


# --------------------------------------------------------------------------- vs brute force


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_matches_brute_force(official, seed):
    rng = np.random.default_rng(seed)
    n, d = 80, 6
    labels = rng.integers(0, 7, size=n)
    labels[0] = 99  # a singleton: must be skipped
    # Mild class structure so APs are neither ~0 nor ~1.
    centers = rng.normal(size=(100, d))
    emb = centers[labels] * 0.7 + rng.normal(size=(n, d))
    ks = [1, 3, 5, 10, 20]
    got = retrieval_metrics(emb, labels, ks=ks, official_ap=official, chunk_size=7)
    ref = reference_retrieval(emb, labels, ks, official)
    assert_same(got, ref, tol=1e-9)
    assert got["queries"] == n - 1
    assert 0.05 < got["map@10"] < 0.95


def test_official_ap_never_below_standard():
    rng = np.random.default_rng(3)
    emb, labels = rng.normal(size=(200, 8)), rng.integers(0, 10, size=200)
    std = retrieval_metrics(emb, labels, ks=(1, 5, 10))
    off = retrieval_metrics(emb, labels, ks=(1, 5, 10), official_ap=True)
    assert off["map@1"] == pytest.approx(std["map@1"])  # identical at K=1
    for k in (5, 10):
        assert off[f"map@{k}"] > std[f"map@{k}"]
        assert off[f"prec@{k}"] == std[f"prec@{k}"]


@pytest.mark.parametrize("official", [False, True])
def test_chunked_equals_unchunked(official):
    rng = np.random.default_rng(4)
    n = 300
    labels = rng.integers(0, 12, size=n)
    emb = torch.from_numpy(rng.normal(size=(n, 16)).astype(np.float32))
    emb[10] = emb[11]  # exact duplicates so tie-breaking must agree across chunk boundaries
    full = retrieval_metrics(emb, labels, ks=(1, 5, 10), official_ap=official, chunk_size=n)
    for chunk in (1, 13, 64, 299):
        assert_same(retrieval_metrics(emb, labels, ks=(1, 5, 10), official_ap=official, chunk_size=chunk), full, 1e-12)
    assert_same(retrieval_metrics(emb, labels, ks=(1, 5, 10), official_ap=official), full, 1e-12)


@pytest.mark.parametrize("official", [False, True])
def test_gallery_blocks_and_a_separate_gallery_match_brute_force(official):
    rng = np.random.default_rng(5)
    n = 120
    labels = rng.integers(0, 9, size=n)
    centers = rng.normal(size=(9, 8))
    queries = (centers[labels] * 0.6 + rng.normal(size=(n, 8))).astype(np.float32)
    gallery = (centers[labels] * 0.6 + rng.normal(size=(n, 8))).astype(np.float32)
    gallery[30] = gallery[31]  # a tie across a block boundary (blocks of 31: items 0-30, 31-61, ...)
    ks = [1, 5, 10]
    ref = reference_retrieval(queries, labels, ks, official, gallery=gallery)
    for chunk, block in ((n, n), (7, 31), (1, 1), (50, 11)):
        got = retrieval_metrics(queries, labels, ks, official, gallery=gallery, chunk_size=chunk, gallery_chunk=block)
        assert_same(got, ref, tol=1e-9)
    same = retrieval_metrics(queries, labels, ks, official, gallery_chunk=17)
    assert_same(same, reference_retrieval(queries, labels, ks, official), tol=1e-9)
    first = retrieval_metrics(queries, labels, ks, official, gallery=gallery, max_queries=40)
    assert first["queries"] == 40


def test_default_chunk_fits_memory_budget_for_20k():
    # N=20,000 must run in chunks whose (chunk, N) working set stays well under 1 GB.
    from scale.metrics import _BYTES_PER_CELL

    n = 20_000
    chunk = max(1, RETRIEVAL_MEMORY_BUDGET_BYTES // (n * _BYTES_PER_CELL))
    assert chunk * n * _BYTES_PER_CELL <= RETRIEVAL_MEMORY_BUDGET_BYTES < 2**30
    assert chunk >= 100  # and not so small that it crawls


# --------------------------------------------------------------------------- perfect / random


def one_hot_embeddings(labels: np.ndarray) -> np.ndarray:
    _, ids = np.unique(labels, return_inverse=True)
    return np.eye(ids.max() + 1)[ids]


def test_perfect_embeddings_score_one():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(8), 12)
    rng.shuffle(labels)
    emb = one_hot_embeddings(labels)
    for official in (False, True):
        got = retrieval_metrics(emb, labels, ks=(1, 5, 10), official_ap=official)
        for k in (1, 5, 10):
            assert got[f"map@{k}"] == pytest.approx(1.0)
            assert got[f"prec@{k}"] == pytest.approx(1.0)
    clus = clustering_metrics(emb, labels)
    assert clus["nmi"] == pytest.approx(1.0)
    assert clus["purity"] == pytest.approx(1.0)


def test_random_embeddings_score_low():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 10, size=400)
    emb = rng.normal(size=(400, 32))
    got = retrieval_metrics(emb, labels, ks=(1, 10))
    assert got["prec@1"] < 0.25 and got["map@10"] < 0.25
    clus = clustering_metrics(emb, labels, seed=0)
    assert clus["nmi"] < 0.15


def test_string_labels_and_tensor_inputs_match_ints():
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 5, size=60)
    names = np.array(["sku-a", "sku-b", "sku-c", "sku-d", "sku-e"])[ids]
    emb = rng.normal(size=(60, 4))
    ref = retrieval_metrics(emb, ids, ks=(1, 5))
    assert_same(retrieval_metrics(emb, list(names), ks=(1, 5)), ref)
    assert_same(retrieval_metrics(torch.from_numpy(emb), torch.from_numpy(ids), ks=(1, 5)), ref, 1e-6)
    assert isinstance(ref["map@1"], float) and isinstance(ref["queries"], int)
    clus_int = clustering_metrics(emb, ids)
    assert clustering_metrics(emb, names) == clus_int


def test_retrieval_input_validation():
    emb = angles([0, 10, 20])
    with pytest.raises(ValueError, match="N-1"):
        retrieval_metrics(emb, [0, 0, 1], ks=(3,))
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(emb, [0, 0], ks=(1,))
    bad = emb.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(bad, [0, 0, 1], ks=(1,))


# --------------------------------------------------------------------------- linear probe


def blobs(rng, n_per, n_classes, d, spread):
    centers = rng.normal(size=(n_classes, d)) * spread
    labels = np.repeat(np.arange(n_classes), n_per)
    return centers[labels] + rng.normal(size=(len(labels), d)), labels


def test_linear_probe_separable_is_near_perfect():
    rng = np.random.default_rng(8)
    emb, labels = blobs(rng, 40, 5, 16, spread=6.0)
    got = linear_probe_accuracy(emb, labels, seed=0)
    assert got["accuracy"] > 0.97
    assert got["train_size"] + got["test_size"] == len(labels)
    assert got["test_size"] == 100


def test_linear_probe_noise_is_near_chance():
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 4, size=400)
    emb = rng.normal(size=(400, 8))
    got = linear_probe_accuracy(emb, labels, seed=0)
    assert abs(got["accuracy"] - 0.25) < 0.1


def test_group_split_prevents_instance_leakage():
    # 40 products, each a random point in 64-d with 10 near-duplicate listings, and a label that
    # is random per product: it can only be predicted by memorising the product. A random split
    # leaks listings of test products into train (accuracy ~1); a group split cannot (~chance).
    rng = np.random.default_rng(10)
    n_groups, per = 40, 10
    product_vec = rng.normal(size=(n_groups, 64))
    product_label = rng.permutation(np.repeat([0, 1], n_groups // 2))
    groups = np.repeat(np.arange(n_groups), per)
    emb = product_vec[groups] + 0.05 * rng.normal(size=(len(groups), 64))
    labels = product_label[groups]

    leaky = linear_probe_accuracy(emb, labels, seed=0)
    grouped = linear_probe_accuracy(emb, labels, groups=groups, seed=0)
    assert leaky["accuracy"] > 0.95
    assert grouped["accuracy"] < 0.8
    # Whole groups move together: sizes are multiples of the group size.
    assert grouped["train_size"] % per == 0 and grouped["test_size"] % per == 0
    assert grouped["test_size"] == n_groups // 2 * per


def test_linear_probe_class_only_in_test_counts_as_error():
    # Class 2 is a single group, so the group split puts it wholly in train or wholly in test.
    # Reproduce the (seeded) split to pick a seed where it is test-only: those samples can never
    # be predicted, so they must count as errors rather than crash or be dropped.
    from sklearn.model_selection import GroupShuffleSplit

    rng = np.random.default_rng(11)
    emb, labels = blobs(rng, 30, 3, 8, spread=8.0)
    groups = np.where(labels == 2, 1000, np.arange(len(labels)))
    for seed in range(100):
        _, test_idx = next(GroupShuffleSplit(n_splits=1, test_size=0.5, random_state=seed).split(emb, labels, groups))
        if np.any(labels[test_idx] == 2):
            break
    else:  # pragma: no cover
        pytest.skip("no seed put the class-2 group into test")
    got = linear_probe_accuracy(emb, labels, groups=groups, seed=seed, test_size=0.5)
    assert got["test_size"] == len(test_idx)
    n_test, n_unseen = len(test_idx), int(np.sum(labels[test_idx] == 2))
    ceiling = (n_test - n_unseen) / n_test
    assert 0.95 * ceiling < got["accuracy"] <= ceiling + 1e-12


def test_linear_probe_single_train_class_raises():
    emb = np.random.default_rng(12).normal(size=(20, 3))
    with pytest.raises(ValueError, match="2 classes"):
        linear_probe_accuracy(emb, np.zeros(20, dtype=int))


# --------------------------------------------------------------------------- clustering


def test_clustering_perfect_vs_shuffled_labels():
    rng = np.random.default_rng(13)
    emb, labels = blobs(rng, 30, 4, 8, spread=10.0)
    good = clustering_metrics(emb, labels)
    assert good["nmi"] > 0.95 and good["purity"] > 0.95
    shuffled = clustering_metrics(emb, rng.permutation(labels))
    assert shuffled["nmi"] < 0.1
    assert shuffled["purity"] < 0.45  # chance purity for 4 balanced classes is ~0.25-0.35
    assert math.isclose(clustering_metrics(emb, labels, seed=0)["nmi"], good["nmi"])  # deterministic


def test_clustering_purity_definition_and_n_clusters():
    # One cluster per sample -> purity 1 trivially (documented caveat); one cluster -> majority share.
    emb = angles([0, 1, 2, 90, 91, 180])
    labels = [0, 0, 1, 1, 1, 1]
    assert clustering_metrics(emb, labels, n_clusters=6)["purity"] == pytest.approx(1.0)
    assert clustering_metrics(emb, labels, n_clusters=1)["purity"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        clustering_metrics(emb, labels, n_clusters=7)
