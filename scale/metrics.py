"""Downstream evaluation metrics over embeddings (SCALE / M5Product protocol).

Three families of metrics, each a pure function of an ``(N, D)`` embedding array and ``N`` labels
(torch tensors or numpy arrays; labels may be ints or strings). Every function returns a dict of
plain Python numbers, so results can be logged or JSON-dumped directly.

* :func:`retrieval_metrics` -- leave-one-out instance retrieval ranked by cosine similarity,
  reporting ``map@K`` and ``prec@K``.
* :func:`linear_probe_accuracy` -- a standardised multinomial logistic regression trained on a
  train split of the frozen embeddings, optionally split by group (product instance) to stop
  listings of one product leaking between train and test.
* :func:`clustering_metrics` -- k-means on L2-normalised embeddings scored by NMI, purity and ARI.

Mean average precision at K
---------------------------
For a query with ``P`` positives in the gallery and a ranked relevance list ``rel(1..K)``::

    Precision@k  = (1/k) * sum_{i<=k} rel(i)
    standard AP@K = 1 / min(K, P)       * sum_{k<=K} Precision@k * rel(k)
    official AP@K = 1 / hits_in_top_K   * sum_{k<=K} Precision@k * rel(k)   (0 when no hits)

The *standard* definition is the usual one: a perfect ranking scores 1 and missing positives are
penalised. The *official* definition is what the official M5Product evaluation code computes: it
normalises by the number of hits actually retrieved, so only the *order* of the hits that were
found matters -- a single hit at rank 1 followed by K-1 misses scores 1.0. It therefore inflates AP
(``official >= standard`` always) and is only offered to reproduce published numbers.

scikit-learn is used wherever it implements the metric (logistic regression, k-means, NMI,
contingency tables). AP@K is hand-written because scikit-learn's ``average_precision_score`` is
neither truncated at K nor has the official normalisation, and both definitions must be available
from one vectorised code path (see :func:`ap_at_k`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ap_at_k", "clustering_metrics", "linear_probe_accuracy", "macro_f1", "retrieval_metrics"]

RETRIEVAL_MEMORY_BUDGET_BYTES = 256 * 2**20
"""Working-memory budget for one chunk of queries in :func:`retrieval_metrics` (the ``(chunk, N)``
similarity / sort-key matrices). N=20,000 gives chunks of ~560 queries, far below 1 GB."""

GALLERY_BLOCK = 65_536
"""Gallery items scored at once per query chunk (default): a 1M-product gallery is 16 blocks, and
the query chunk stays ~170 queries under the memory budget instead of ~10."""

# Bytes per (query, gallery) cell held at once: float32 similarity, its int32 bit pattern, the
# int64 sort key and topk's temporaries -- generous so the budget is an upper bound.
_BYTES_PER_CELL = 24


def _as_float_tensor(embeddings: Any) -> torch.Tensor:
    x = embeddings if isinstance(embeddings, torch.Tensor) else torch.as_tensor(np.asarray(embeddings))
    x = x.detach()
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(x.shape)}")
    # float32 everywhere: float16/bfloat16 matmuls would create spurious ties in the ranking.
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        # NaN/inf would silently scramble rankings, k-means and the probe; fail loudly instead.
        raise ValueError("embeddings contain NaN or inf")
    return x


def _as_numpy(embeddings: Any) -> np.ndarray:
    return _as_float_tensor(embeddings).cpu().numpy()


def _encode_labels(labels: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (ints, strings, tensor) -> (class ids in 0..C-1, class values)."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"labels must be 1-D with {n} entries (one per embedding), got shape {arr.shape}")
    classes, ids = np.unique(arr, return_inverse=True)
    return ids.reshape(-1).astype(np.int64), classes


def ap_at_k(relevance: Any, num_positives: Any, k: int, official_ap: bool = False) -> np.ndarray:
    """Per-query AP@K from a ranked relevance matrix.

    Args:
        relevance: ``(Q, >=k)`` boolean/0-1 matrix; row ``q`` is the relevance of query ``q``'s
            ranked results (best first). Only the first ``k`` columns are used.
        num_positives: ``(Q,)`` number of positives of each query in the whole gallery (used only
            by the standard definition). Queries with 0 positives get AP 0.
        k: cut-off.
        official_ap: ``False`` -> divide by ``min(k, num_positives)``; ``True`` -> divide by the
            number of hits in the top ``k`` (the official M5Product definition; see module doc).

    Returns:
        ``(Q,)`` float64 array of AP@K values in [0, 1].
    """
    rel = torch.as_tensor(np.asarray(relevance) if not isinstance(relevance, torch.Tensor) else relevance)
    rel = rel[:, :k].to(torch.float64)
    if rel.shape[1] < k:
        raise ValueError(f"relevance has {rel.shape[1]} columns, need at least k={k}")
    npos = torch.as_tensor(np.asarray(num_positives) if not isinstance(num_positives, torch.Tensor) else num_positives)
    npos = npos.to(device=rel.device, dtype=torch.float64)
    hits = rel.cumsum(dim=1)
    ranks = torch.arange(1, k + 1, device=rel.device, dtype=torch.float64)
    summed = (hits / ranks * rel).sum(dim=1)
    denom = hits[:, -1] if official_ap else torch.clamp(npos, max=float(k))
    # Zero denominators only occur with zero hits, where `summed` is also 0: AP is defined as 0.
    ap = torch.where(denom > 0, summed / denom.clamp(min=1.0), torch.zeros_like(summed))
    return ap.cpu().numpy()


def _ordered_int_keys(sims: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Map float32 similarities to int64 keys that sort like (similarity desc, index asc).

    ``torch.topk`` makes no promise about which of several equal values it returns, so ties (e.g.
    duplicate listings with identical embeddings) would make the metric depend on the backend. The
    float's bit pattern is turned into an order-preserving int32, shifted into the high bits, and
    ``2**31 - 1 - index`` is put in the low bits: equal similarities then rank the lower index first
    and every key is distinct, so topk is exact and deterministic. `offset`: the gallery index of
    column 0 (a block of the gallery), so keys of different blocks compare as one ranking.
    """
    bits = sims.contiguous().view(torch.int32)
    # Negative floats sort in reverse order of their (sign-magnitude) bit patterns; flipping the
    # magnitude bits of negatives (arithmetic shift -> all-ones mask) makes int32 order = float order.
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    keys = bits.to(torch.int64)
    # In place: this runs on the largest tensor of the loop, extra temporaries cost time and memory.
    columns = torch.arange(offset, offset + sims.shape[1], device=sims.device, dtype=torch.int64)
    keys.mul_(2**31).add_(2**31 - 1 - columns)
    return keys


def retrieval_metrics(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] = (1, 5, 10),
    official_ap: bool = False,
    *,
    gallery: Any = None,
    chunk_size: int | None = None,
    gallery_chunk: int | None = None,
    max_queries: int | None = None,
) -> dict[str, float]:
    """Leave-one-out retrieval mAP@K and Precision@K.

    Every sample is a query against all *other* samples (itself excluded), ranked by cosine
    similarity (embeddings are L2-normalised first); equal similarities are ranked by ascending
    index. A result is relevant when it has the query's label. Queries whose label occurs nowhere
    else have no positive and are skipped; ``"queries"`` reports how many were used.

    ``gallery`` gives the gallery side its own embedding of the same ``N`` items (e.g. queries
    embedded from title + image, the gallery from all five modalities): item ``i`` is still left
    out of query ``i``'s results.

    AP definitions (see the module docstring):

    * ``official_ap=False`` (standard): ``AP@K = sum_{k<=K} P@k * rel(k) / min(K, #positives)``.
    * ``official_ap=True`` (official M5Product evaluation): same sum divided by the number of hits
      in the top K (0 if none). Inflates AP; use only to compare with published numbers.

    Memory: the ``(N, N)`` similarity matrix is never formed. Queries go in chunks of
    ``chunk_size`` and, within a chunk, the gallery in blocks of ``gallery_chunk``; each block's
    top K is merged into the running top K (exact: keys are distinct, see `_ordered_int_keys`).
    The working set is ``chunk_size x gallery_chunk`` cells (defaults keep it under
    :data:`RETRIEVAL_MEMORY_BUDGET_BYTES`), besides the embeddings themselves.

    Args:
        embeddings: ``(N, D)`` query embeddings. Computation runs on their device (CPU for numpy).
        labels: ``N`` labels, ints or strings.
        ks: cut-offs; each must satisfy ``1 <= K <= N - 1``.
        official_ap: choose the AP definition.
        gallery: ``(N, D')`` gallery embeddings of the same items; default: ``embeddings``.
        chunk_size: queries per chunk. Results do not depend on it.
        gallery_chunk: gallery items per block. Results do not depend on it.
        max_queries: score only the first this many queries that have a positive (a large
            gallery's benchmark); default: all.

    Returns:
        ``{"map@K": ..., "prec@K": ... for each K, "queries": number of queries used}``; map/prec
        are fractions in [0, 1] averaged over the used queries (0.0 if no query has a positive).
    """
    x = _as_float_tensor(embeddings)
    g = x if gallery is None else _as_float_tensor(gallery).to(x.device)
    n = x.shape[0]
    if g.shape[0] != n:
        raise ValueError(f"gallery has {g.shape[0]} items, the queries {n}: both embed the same items")
    if g.shape[1] != x.shape[1]:
        raise ValueError(f"gallery embeddings are {g.shape[1]}-d, queries {x.shape[1]}-d")
    ids_np, _ = _encode_labels(labels, n)
    ks = sorted({int(k) for k in ks})
    if not ks:
        raise ValueError("ks must not be empty")
    if ks[0] < 1 or ks[-1] > n - 1:
        raise ValueError(f"every K must be in [1, N-1] = [1, {n - 1}], got {ks}")
    kmax = ks[-1]

    x = F.normalize(x, dim=1)  # zero vectors stay zero (similarity 0 to everything)
    g = x if gallery is None else F.normalize(g, dim=1)
    ids = torch.as_tensor(ids_np, device=x.device)
    counts = torch.bincount(ids)
    num_pos = counts[ids] - 1  # positives of each query, excluding the query itself

    gallery_chunk = min(n, GALLERY_BLOCK) if gallery_chunk is None else gallery_chunk
    if chunk_size is None:
        chunk_size = max(1, RETRIEVAL_MEMORY_BUDGET_BYTES // (min(gallery_chunk, n) * _BYTES_PER_CELL))
    if chunk_size < 1 or gallery_chunk < 1:
        raise ValueError(f"chunk_size and gallery_chunk must be >= 1, got {chunk_size}, {gallery_chunk}")
    budget = n if max_queries is None else int(max_queries)

    ap_sums = {k: 0.0 for k in ks}
    prec_sums = {k: 0.0 for k in ks}
    used = 0
    for start in range(0, n, chunk_size):
        if used >= budget:
            break
        stop = min(start + chunk_size, n)
        # Only queries with a positive are scored: skip the rest before any matmul.
        q_idx = torch.arange(start, stop, device=x.device)[num_pos[start:stop] > 0][: budget - used]
        if len(q_idx) == 0:
            continue
        top = _top_k(x[q_idx], g, q_idx, kmax, gallery_chunk)
        rel = ids[top] == ids[q_idx].unsqueeze(1)
        npos = num_pos[q_idx]
        for k in ks:
            ap_sums[k] += float(ap_at_k(rel, npos, k, official_ap=official_ap).sum())
            prec_sums[k] += float(rel[:, :k].sum().item()) / k
        used += len(q_idx)

    out: dict[str, float] = {}
    for k in ks:
        out[f"map@{k}"] = ap_sums[k] / used if used else 0.0
        out[f"prec@{k}"] = prec_sums[k] / used if used else 0.0
    out["queries"] = used
    return out


def _top_k(queries: torch.Tensor, gallery: torch.Tensor, query_index: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Indices of the k most similar gallery items of each query, best first, the query's own item
    excluded, gallery scanned in blocks of `block` (the running top k merged with each block's)."""
    key_floor = torch.iinfo(torch.int64).min
    rows = torch.arange(len(query_index), device=queries.device)
    best_keys = best_index = None
    for start in range(0, gallery.shape[0], block):
        keys = _ordered_int_keys(queries @ gallery[start : start + block].T, offset=start)
        # Self-exclusion: the smallest possible key ranks the query's own item last, and
        # K <= N-1 keeps it out of every top K.
        own = (query_index >= start) & (query_index < start + keys.shape[1])
        keys[rows[own], query_index[own] - start] = key_floor
        keys, index = keys.topk(min(k, keys.shape[1]), dim=1, largest=True, sorted=True)
        index = index + start
        if best_keys is not None:
            merged = torch.cat([best_keys, keys], dim=1)
            keys, order = merged.topk(min(k, merged.shape[1]), dim=1, largest=True, sorted=True)
            index = torch.cat([best_index, index], dim=1).gather(1, order)
        best_keys, best_index = keys, index
    return best_index


def linear_probe_accuracy(
    embeddings: Any,
    labels: Any,
    groups: Any = None,
    seed: int = 0,
    test_size: float = 0.5,
) -> dict[str, float]:
    """Linear-probe classification accuracy on frozen embeddings.

    Features are standardised (``StandardScaler`` fitted on the train split only, so no test
    statistics leak) and classified with multinomial ``LogisticRegression`` (lbfgs, max_iter=1000).

    Split: with ``groups`` (e.g. product-instance ids) a ``GroupShuffleSplit`` puts every group
    wholly in train or wholly in test -- otherwise near-duplicate listings of one product in both
    splits let the probe memorise instances and inflate accuracy. Without groups a plain random
    ``ShuffleSplit`` is used (not stratified, so rare classes may end up only in test). With
    groups, ``test_size`` is the fraction of *groups*, not of samples.

    Test samples whose class never appears in train cannot be predicted and count as errors.

    Macro-F1 is scikit-learn's ``f1_score(average="macro")`` over the classes of the test split
    and of the predictions (a class absent from both does not dilute it; one only in test scores 0).

    Returns:
        ``{"accuracy": float in [0, 1], "macro_f1": float in [0, 1], "train_size": int,
        "test_size": int}`` (sizes in samples).

    Raises:
        ValueError: fewer than 2 classes in the train split (logistic regression is undefined).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = _as_numpy(embeddings)
    n = x.shape[0]
    y, _ = _encode_labels(labels, n)
    if groups is not None:
        if isinstance(groups, torch.Tensor):
            groups = groups.detach().cpu().numpy()
        g = np.asarray(groups)
        if g.shape != (n,):
            raise ValueError(f"groups must be 1-D with {n} entries, got shape {g.shape}")
        splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        train_idx, test_idx = next(splitter.split(x, y, groups=g))
    else:
        splitter = ShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        train_idx, test_idx = next(splitter.split(x, y))

    n_train_classes = len(np.unique(y[train_idx]))
    if n_train_classes < 2:
        raise ValueError(
            f"linear probe needs at least 2 classes in the train split, got {n_train_classes} "
            f"({len(train_idx)} train samples); use more data, more classes or a different seed/test_size"
        )

    probe = make_pipeline(StandardScaler(), LogisticRegression(solver="lbfgs", max_iter=1000, random_state=seed))
    probe.fit(x[train_idx], y[train_idx])
    # The probe only ever predicts train classes, so test-only classes are automatically errors.
    predicted = probe.predict(x[test_idx]) if len(test_idx) else np.zeros(0, dtype=np.int64)
    accuracy = float(np.mean(predicted == y[test_idx])) if len(test_idx) else 0.0
    f1 = macro_f1(predicted, y[test_idx]) if len(test_idx) else 0.0
    return {"accuracy": accuracy, "macro_f1": f1, "train_size": int(len(train_idx)), "test_size": int(len(test_idx))}


def macro_f1(predicted: Any, labels: Any) -> float:
    """scikit-learn's ``f1_score(average="macro")``: the mean over the classes that occur as a label
    or a prediction (a class absent from both does not dilute it; one never predicted scores 0)."""
    from sklearn.metrics import f1_score

    as_numpy = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in (predicted, labels)]
    return float(f1_score(as_numpy[1], as_numpy[0], average="macro", zero_division=0))


def clustering_metrics(
    embeddings: Any,
    labels: Any,
    n_clusters: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """k-means clustering quality against ground-truth labels.

    Embeddings are L2-normalised before ``KMeans(n_init=10)`` so Euclidean k-means agrees with the
    cosine geometry used for retrieval. ``n_clusters`` defaults to the number of distinct labels.

    Returns:
        ``{"nmi": normalized_mutual_info_score (arithmetic mean normalisation), "purity": fraction
        of samples whose cluster's majority label equals their own, "ari": adjusted_rand_score}``;
        NMI and purity in [0, 1], ARI in [-0.5, 1] (0 = chance). Purity grows trivially with
        ``n_clusters``; NMI and ARI are the numbers to compare across settings.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    x = F.normalize(_as_float_tensor(embeddings), dim=1).cpu().numpy()
    n = x.shape[0]
    y, classes = _encode_labels(labels, n)
    k = len(classes) if n_clusters is None else int(n_clusters)
    if not 1 <= k <= n:
        raise ValueError(f"n_clusters must be in [1, N={n}], got {k}")

    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    contingency = contingency_matrix(y, pred)  # (classes, clusters)
    return {
        "nmi": float(normalized_mutual_info_score(y, pred)),
        "purity": float(contingency.max(axis=0).sum() / n),
        "ari": float(adjusted_rand_score(y, pred)),
    }
