"""SaHa mining: hand-worked clusters (docs/method.md §2), a plain-Python reference, sharded top-pool,
the judge hook, the report and the cluster file."""

import json

import jax
import numpy as np
import pytest

from g2e import mining
from g2e.data import rows
from g2e.mining import owners


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, np.float64)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def one_device_mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("candidates",))


# ----------------------------------------------------------------------------- hand-worked

# Classification-like: three classes A, B, C (candidates e0, e1, e2); each query is
# (class scores | identity part), all with squared norm 30, so inner products below are /30.
CLASS_QUERIES = {
    "q0": (3, 2, 1, 4, 0),  # class A; retrieves A > B > C
    "q1": (3, 1, 2, 0, 4),  # class A; retrieves A > C > B
    "q2": (1, 3, 2, 4, 0),  # class B
    "q3": (2, 3, 1, 0, 4),  # class B
    "q4": (1, 2, 3, 4, 0),  # class C
    "q5": (2, 1, 3, 0, 4),  # class C
    "q6": (3, 1, 2, 4, 0),  # class A; retrieves A > C > B
}
CLASS_ROWS = [
    ("q0", "A"),
    ("q1", "A"),
    ("q2", "B"),
    ("q3", "B"),
    ("q4", "C"),
    ("q5", "C"),
    ("q6", "A"),
]
CLASSES = {"A": (1, 0, 0, 0, 0), "B": (0, 1, 0, 0, 0), "C": (0, 0, 1, 0, 0)}


def class_case():
    query_keys = [q for q, _ in CLASS_ROWS]
    positive_keys = [p for _, p in CLASS_ROWS]
    queries = unit([CLASS_QUERIES[q] for q in query_keys])
    positives = unit([CLASSES[p] for p in positive_keys])
    return query_keys, positive_keys, queries, positives


@pytest.mark.parametrize(
    "keep_order, expected",
    [
        # top_k=2, pool_mult=1: first_n=2, pool=min(4, 3 candidates)=3.
        # Row 0 (q0): drops A; B -> argmax(q0.q2=27, q0.q3=13) = q2; C -> (q0.q4=26, q0.q5=11) =
        #   q4. Retrieval order [q2, q4]; ascending similarity [q4 (26), q2 (27)]. Used q0 q2 q4.
        # Row 1 (q1): drops A; C -> q5 (q1.q5=29), B -> q3 (q1.q3=27): retrieval [q5, q3],
        #   ascending [q3, q5]. Rows 2-5 are used. Row 6 (q6): C and B have no unused owner: no
        #   cluster. Phase 2 (first_n=4): row 6 may reuse phase-1 owners: C -> (q6.q4=27,
        #   q6.q5=13) = q4; B -> (q6.q2=26, q6.q3=11) = q2: retrieval [q4, q2], ascending [q2, q4].
        (True, [[0, 2, 4], [1, 5, 3], [6, 4, 2]]),
        (False, [[0, 4, 2], [1, 3, 5], [6, 2, 4]]),
    ],
)
@pytest.mark.parametrize("query_sims", ["host", "device"])
def test_classification_shared_positives_and_phase_two(keep_order, expected, query_sims):
    result = mining.mine_clusters(
        *class_case(), top_k=2, pool_mult=1, keep_retrieval_order=keep_order, query_sims=query_sims
    )
    assert result.clusters == expected
    assert result.phases == [1, 1, 2]
    assert (
        mining.build_clusters(*class_case(), top_k=2, pool_mult=1, keep_retrieval_order=keep_order)
        == expected
    )
    report = result.report
    assert (report["phase1"]["clusters"], report["phase2"]["clusters"]) == (2, 1)
    assert report["cluster_size"] == {"min": 3, "mean": 3.0, "max": 3, "histogram": {"3": 3}}
    assert report["rows_uncovered"] == 0 and report["candidates"] == 3 and report["pool"] == 3
    # Phase 1 searched rows 0, 1 and 6; each ranks its own class first.
    assert report["retrieval"] == {"anchors": 3, "hit@1": 1.0, "hit@5": 1.0, "hit@10": 1.0}


def test_first_n_stops_the_walk_and_top_k_keeps_the_least_anchor_like():
    # top_k=1, pool_mult=2: first_n=2, pool=3.
    # Row 0 (q0): [B -> q2 (27), C -> q4 (26)]; ascending [q4, q2]; keep q4. Used q0 q4.
    # Row 1 (q1): [C -> q5 (29; q4 used), B -> (q1.q2=10, q1.q3=27) = q3]; keep q3.
    # Row 2 (q2): retrieves B > C > A, drops B: [C -> q5 (q2.q5=11), A -> q6 (q2.q6=26; q0
    #   and q1 used)]; keep q5. Rows 3-5 are used. Row 6 (q6): C and B owners all used.
    # Phase 2 (first_n=4): row 6: [C -> (q6.q4=27, q6.q5=13) = q4, B -> (q6.q2=26,
    #   q6.q3=11) = q2]; ascending [q2, q4]; keep q2.
    result = mining.mine_clusters(*class_case(), top_k=1, pool_mult=2, keep_retrieval_order=False)
    assert result.clusters == [[0, 4], [1, 3], [2, 5], [6, 2]]
    assert result.phases == [1, 1, 1, 2]


# Retrieval-like with duplicate queries: x asks twice (rows 1 and 3, positives P and Q); x's
# representative row is 3. Candidates P, Q, R, S are e0..e3; squared norms 30.
DUP_QUERIES = {
    "u": (4, 3, 2, 1, 0, 0),
    "x": (1, 4, 3, 2, 0, 0),
    "y": (0, 5, 1, 2, 0, 0),
    "z": (1, 2, 5, 0, 0, 0),
    "v": (2, 1, 5, 0, 0, 0),
    "w": (2, 0, 1, 5, 0, 0),
}
DUP_ROWS = [("u", "S"), ("x", "P"), ("y", "Q"), ("x", "Q"), ("z", "R"), ("v", "R"), ("w", "S")]
DUP_CANDIDATES = {c: np.eye(6)[i] for i, c in enumerate("PQRS")}


@pytest.mark.parametrize("query_sims", ["host", "device"])
def test_duplicate_queries_and_a_key_owning_two_candidates(query_sims):
    # top_k=3, pool_mult=1: first_n=3, pool=4. Owners: P {x}, Q {y, x}, R {z, v}, S {u, w}.
    # Row 0 (u): retrieves P > Q > R > S, drops S. P -> x (u.x=24). Q -> {y, x}: x is already
    #   this cluster's owner, so y (u.y=19). R -> (u.z=20, u.v=21) = v. Ascending: y, v, x,
    #   placed as rows 2, 5 and x's representative row 3.
    # Row 1 (x) and row 3 (x) are skipped with their key; row 2 (y) too.
    # Row 4 (z): retrieves R > Q > P > S, drops R; Q and P have only used owners; S -> w.
    result = mining.mine_clusters(
        [q for q, _ in DUP_ROWS],
        [p for _, p in DUP_ROWS],
        unit([DUP_QUERIES[q] for q, _ in DUP_ROWS]),
        unit([DUP_CANDIDATES[p] for _, p in DUP_ROWS]),
        top_k=3,
        pool_mult=1,
        keep_retrieval_order=False,
        query_sims=query_sims,
    )
    assert result.clusters == [[0, 2, 5, 3], [4, 6]]
    assert result.report["unique_queries"] == 6 and result.report["rows_uncovered"] == 1


def test_the_anchor_key_is_never_its_own_owner():
    # x asks twice (positives P and Q); y's positive is Q. Row 0 (x) drops P, retrieves Q whose
    # owners are x itself (similarity 1) and y: the anchor's own key is passed over.
    clusters = mining.build_clusters(
        ["x", "x", "y"],
        ["P", "Q", "Q"],
        unit([[1, 0, 0], [1, 0, 0], [0, 0, 1]]),
        unit([[1, 0, 0], [0, 1, 0], [0, 1, 0]]),
        top_k=1,
        pool_mult=1,
        keep_retrieval_order=False,
    )
    assert clusters == [[0, 2]]


@pytest.mark.parametrize("query_sims", ["host", "device"])
def test_ties_go_to_the_lower_representative_row(query_sims):
    # b and c have identical queries (exactly representable, so exact ties) and share Q;
    # c's representative row (3) is after b's (2) although key c appears first.
    # Row 0 (a): drops P; Q -> tie between b (row 2) and c (row 3) -> b. Row 1 (c): drops Q;
    # P's owner a is used: no cluster. Row 3 (c) again: no cluster. Phase 2: row 1 (c):
    # P -> a, reused -> [1, 0]; then c is used and row 3 is skipped.
    half = [0.5, 0.5, 0.5, 0.5]
    queries = np.asarray([[1, 0, 0, 0], half, half, half], np.float32)
    positives = np.asarray([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]], np.float32)
    result = mining.mine_clusters(
        ["a", "c", "b", "c"],
        ["P", "Q", "Q", "Q"],
        queries,
        positives,
        top_k=1,
        pool_mult=1,
        keep_retrieval_order=False,
        query_sims=query_sims,
    )
    assert result.clusters == [[0, 2], [1, 0]]
    assert result.report["phase1"]["anchors_searched"] == 3


# ----------------------------------------------------------------------------- reference


def reference_clusters(
    query_keys,
    positive_keys,
    queries,
    positives,
    top_k,
    pool_mult,
    keep_order,
    judge=None,
    threshold=0.5,
):
    """docs/method.md §2 one anchor and one candidate at a time, with the documented decisions."""
    cand_keys = list(dict.fromkeys(positive_keys))
    cand_index = {k: i for i, k in enumerate(cand_keys)}
    cand_vectors = np.stack([positives[positive_keys.index(k)] for k in cand_keys])
    owners, rep, qvec = {}, {}, {}
    for i, (q, p) in enumerate(zip(query_keys, positive_keys)):
        owners.setdefault(cand_index[p], set()).add(q)
        rep[q] = i
        qvec.setdefault(q, queries[i].astype(np.float64))
    first_n = top_k * pool_mult
    pool = min(2 * first_n, len(cand_keys))
    used, clusters, judged = set(), [], [0, 0]

    def run(first_n, phase2):
        reused = set()
        for i, q in enumerate(query_keys):
            if q in used:
                continue
            sims = cand_vectors.astype(np.float64) @ queries[i].astype(np.float64)
            order = sorted(range(len(cand_keys)), key=lambda c: (-sims[c], c))[:pool]
            picked = []
            for c in order:
                if c == cand_index[positive_keys[i]]:
                    continue
                excluded = reused if phase2 else used
                options = [o for o in owners[c] if o not in excluded and o != q and o not in picked]
                if options:
                    picked.append(max(options, key=lambda o: (qvec[o] @ qvec[q], -rep[o])))
                if len(picked) == first_n:
                    break
            if not keep_order:
                picked.sort(key=lambda o: (qvec[o] @ qvec[q], rep[o]))
            kept = picked[:top_k]
            if judge is not None:
                kept, start = [], 0
                while len(kept) < top_k and start < len(picked):
                    batch = picked[start : start + top_k - len(kept)]
                    start += len(batch)
                    p_yes = judge(i, np.asarray([rep[o] for o in batch]))
                    kept += [o for o, p in zip(batch, p_yes) if p <= threshold]
                    judged[0] += len(batch)
                    judged[1] += int(np.sum(np.asarray(p_yes) > threshold))
            if not kept:
                continue
            clusters.append([i] + [rep[o] for o in kept])
            used.add(q)
            used.update(kept)
            if phase2:
                reused.update(kept)

    run(first_n, False)
    run(2 * first_n, True)
    return clusters, judged


def random_case(seed, rows=160, num_queries=120, num_positives=25, dim=24):
    """Random unit embeddings with shared positives, duplicate queries (some with several
    positives), in a shuffled row order."""
    rng = np.random.default_rng(seed)
    query_ids = np.concatenate(
        [np.arange(num_queries), rng.integers(0, num_queries, rows - num_queries)]
    )
    rng.shuffle(query_ids)
    positive_ids = rng.integers(0, num_positives, rows)
    query_table = unit(rng.standard_normal((num_queries, dim)))
    positive_table = unit(rng.standard_normal((num_positives, dim)))
    return (
        [f"q{i}" for i in query_ids],
        [f"p{i}" for i in positive_ids],
        query_table[query_ids],
        positive_table[positive_ids],
    )


@pytest.mark.parametrize(
    "keep_order, query_sims", [(False, "host"), (True, "host"), (False, "device")]
)
def test_matches_the_one_anchor_at_a_time_reference(keep_order, query_sims):
    case = random_case(seed=1 + keep_order)
    expected, _ = reference_clusters(*case, top_k=2, pool_mult=1, keep_order=keep_order)
    result = mining.mine_clusters(
        *case,
        top_k=2,
        pool_mult=1,
        keep_retrieval_order=keep_order,
        block_size=16,
        candidate_chunk=8,
        query_sims=query_sims,
    )
    assert result.report["query_similarities"] == query_sims
    assert result.clusters == expected
    assert 2 in result.phases  # the case exercises phase 2


@pytest.mark.parametrize("query_sims", ["host", "device"])
def test_mining_does_not_depend_on_the_number_of_devices(query_sims):
    case = random_case(seed=3)
    settings = dict(
        top_k=3,
        pool_mult=2,
        keep_retrieval_order=False,
        block_size=32,
        candidate_chunk=8,
        query_sims=query_sims,
    )
    on_eight = mining.mine_clusters(*case, **settings)
    on_one = mining.mine_clusters(*case, mesh=one_device_mesh(), **settings)
    assert len(jax.devices()) == 8
    assert on_eight.clusters == on_one.clusters and on_eight.report == on_one.report


# ----------------------------------------------------------------------------- sharded top-pool


@pytest.mark.parametrize("mesh_shape", [(8,), (2, 4)])
def test_sharded_top_pool_equals_one_device(mesh_shape):
    rng = np.random.default_rng(0)
    queries = unit(rng.standard_normal((37, 16)))
    candidates = unit(rng.standard_normal((203, 16)))
    # The 2-D mesh is made by jax.make_mesh (explicit axis types), as the stages make theirs.
    if len(mesh_shape) == 1:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("a",))
    else:
        mesh = jax.make_mesh(mesh_shape, ("a", "b"))
    sharded = mining.top_pool(queries, candidates, 20, mesh=mesh, block_size=16, candidate_chunk=32)
    single = mining.top_pool(
        queries, candidates, 20, mesh=one_device_mesh(), block_size=16, candidate_chunk=32
    )
    np.testing.assert_array_equal(sharded[1], single[1])
    np.testing.assert_array_equal(sharded[0], single[0])
    exact = queries.astype(np.float64) @ candidates.astype(np.float64).T
    np.testing.assert_array_equal(sharded[1], np.argsort(-exact, axis=1, kind="stable")[:, :20])
    np.testing.assert_allclose(sharded[0], np.sort(exact, axis=1)[:, ::-1][:, :20], atol=1e-6)


def test_top_pool_ties_go_to_the_lower_index_across_shards():
    # Three distinct candidates (exact dyadic values, so equal rows give equal scores)
    # repeated over 50 indices: every query sees long runs of ties spread over all shards.
    distinct = np.asarray([[0.5, 0.5, 0.5, 0.5], [1, 0, 0, 0], [0, 0.5, 0, 0.5]], np.float32)
    candidates = distinct[np.arange(50) % 3]
    queries = np.asarray([[1, 0, 0, 0], [0, 0.5, 0, 0.5], [0.25, 0.5, 0, 0]], np.float32)
    values, found = mining.top_pool(queries, candidates, 30, block_size=4, candidate_chunk=4)
    scores = queries @ candidates.T
    np.testing.assert_array_equal(found, np.argsort(-scores, axis=1, kind="stable")[:, :30])
    np.testing.assert_array_equal(values, np.take_along_axis(scores, found, axis=1))


# ----------------------------------------------------------------------------- judge


def test_judge_drops_owners_and_they_stay_unused():
    # As in the hand-worked classification case (keep_order False, top_k=2), but the judge
    # says "yes" (a false negative) for row 4 as an owner of anchor 0.
    # Row 0: owners ascending [q4, q2] -> q4 dropped, q2 kept -> [0, 2]; q4 stays unused.
    # Row 1: C -> (q1.q4=11, q1.q5=29) = q5; B -> q3; ascending [q3 (27), q5 (29)].
    # Row 4 (q4) is now an anchor: drops C; B's owners are used; A -> q6 (q0, q1 used).
    calls = []

    def judge(anchor_row, owner_rows):
        calls.append((anchor_row, owner_rows.tolist()))
        return np.asarray([0.9 if (anchor_row, r) == (0, 4) else 0.1 for r in owner_rows])

    result = mining.mine_clusters(
        *class_case(),
        top_k=2,
        pool_mult=1,
        keep_retrieval_order=False,
        judge=judge,
        judge_threshold=0.5,
    )
    assert result.clusters == [[0, 2], [1, 3, 5], [4, 6]]
    assert calls == [(0, [4, 2]), (1, [3, 5]), (4, [6])]
    assert result.report["judge"] == {
        "enabled": True,
        "mode": "sequential",
        "threshold": 0.5,
        "pairs": 5,
        "calls": 3,
        "cached": 0,
        "consulted": 5,
        "dropped": 1,
        "downscaled": 0,
        "unjudged": 0,
    }
    assert result.report["phase1"]["judge_dropped"] == 1


def test_judge_rounds_match_the_reference_and_a_silent_judge_changes_nothing():
    case = random_case(seed=4)
    settings = dict(top_k=3, pool_mult=3, keep_retrieval_order=False)

    def judge(anchor_row, owner_rows):
        return np.where((owner_rows + anchor_row) % 3 == 0, 0.8, 0.2)

    expected, (pairs, dropped) = reference_clusters(
        *case, top_k=3, pool_mult=3, keep_order=False, judge=judge
    )
    result = mining.mine_clusters(*case, judge=judge, **settings)
    assert result.clusters == expected
    assert (result.report["judge"]["pairs"], result.report["judge"]["dropped"]) == (pairs, dropped)
    assert dropped > 0
    silent = mining.mine_clusters(*case, judge=lambda a, o: np.zeros(len(o)), **settings)
    assert silent.clusters == mining.build_clusters(*case, **settings)


def test_a_bad_judge_answer_names_the_anchor():
    with pytest.raises(ValueError, match="anchor row 0"):
        mining.mine_clusters(
            *class_case(),
            top_k=2,
            pool_mult=1,
            keep_retrieval_order=True,
            judge=lambda a, o: np.zeros(len(o) + 1),
        )


# ----------------------------------------------------------------------------- files, subsets


def test_mining_twice_writes_identical_cluster_files(tmp_path):
    case = random_case(seed=5)

    def judge(anchor_row, owner_rows):
        return ((owner_rows * 7 + anchor_row) % 10) / 10.0

    paths = []
    for run in range(2):
        result = mining.mine_clusters(
            *case, top_k=3, pool_mult=2, keep_retrieval_order=False, judge=judge, subset="Toy"
        )
        paths.append(tmp_path / f"run{run}" / "Toy.clusters.json")
        mining.write_clusters(
            str(paths[-1]),
            result.clusters,
            result.phases,
            subset="Toy",
            num_rows=len(case[0]),
            params={"top_k": 3, "pool_mult": 2},
        )
    assert paths[0].read_bytes() == paths[1].read_bytes()
    loaded = mining.read_clusters(str(paths[0]), subset="Toy", num_rows=len(case[0]))
    assert loaded.clusters == result.clusters and loaded.phases == result.phases
    assert loaded.params == {"top_k": 3, "pool_mult": 2}
    assert json.loads(paths[0].read_text())["format_version"] == mining.FORMAT_VERSION
    assert json.loads(json.dumps(result.report)) == result.report  # the stage writes it as JSON


def test_cluster_file_errors(tmp_path):
    path = str(tmp_path / "c.json")
    mining.write_clusters(path, [[0, 1], [2, 0]], [1, 2], subset="S", num_rows=3)
    with pytest.raises(ValueError, match="mined for 3 rows but the data has 4"):
        mining.read_clusters(path, num_rows=4)
    with pytest.raises(ValueError, match="expected 'T'"):
        mining.read_clusters(path, subset="T")
    content = json.loads(open(path).read())
    content["format_version"] = 99
    with open(path, "w") as f:
        json.dump(content, f)
    with pytest.raises(ValueError, match="format_version 99"):
        mining.read_clusters(path)
    with pytest.raises(ValueError, match="outside"):
        mining.write_clusters(path, [[0, 3]], [1], subset="S", num_rows=3)


def test_classification_subsets_keep_retrieval_order():
    for name in (
        "ImageNet_1K",
        "Place365",
        "N24News",
        "HatefulMemes",
        "VOC2007",
        "SUN397",
        "ImageNet-A",
        "ImageNet-R",
        "ObjectNet",
        "Country211",
    ):
        assert mining.keeps_retrieval_order(name), name
    for name in ("MSCOCO_t2i", "VisDial", "OK-VQA", "MSCOCO", "CIRR"):
        assert not mining.keeps_retrieval_order(name), name


def test_index_keys_and_ranges():
    keys, ids = rows.index_keys([("a", None), "b", ("a", None), 3])
    assert ids.tolist() == [0, 1, 0, 2] and keys == [("a", None), "b", 3]
    assert rows.first_of_each(ids).tolist() == [0, 1, 3]
    ptr = np.asarray([0, 2, 2, 5])
    assert owners.ranges(ptr, np.asarray([2, 0, 1])).tolist() == [2, 3, 4, 0, 1]


def test_no_rows_and_a_lone_row():
    empty = np.zeros((0, 4), np.float32)
    assert (
        mining.build_clusters(
            [], [], empty, empty, top_k=2, pool_mult=1, keep_retrieval_order=False
        )
        == []
    )
    lone = np.eye(4, dtype=np.float32)[:1]
    result = mining.mine_clusters(
        ["a"], ["p"], lone, lone, top_k=2, pool_mult=1, keep_retrieval_order=False
    )
    assert result.clusters == [] and result.report["rows_uncovered"] == 1


def test_auto_query_similarities_follow_the_owner_density():
    # Classification-like: 3 candidates owned by 7 queries -> the device; a sparse retrieval
    # subset (one owner per candidate, many queries) -> the host.
    dense = mining.mine_clusters(*class_case(), top_k=2, pool_mult=1, keep_retrieval_order=True)
    assert dense.report["query_similarities"] == "device"
    rng = np.random.default_rng(0)
    sparse = unit(rng.standard_normal((300, 8)))
    result = mining.mine_clusters(
        list(range(300)),
        list(range(300)),
        sparse,
        sparse[::-1],
        top_k=1,
        pool_mult=1,
        keep_retrieval_order=False,
    )
    assert result.report["query_similarities"] == "host"
    with pytest.raises(ValueError, match="query_sims"):
        mining.mine_clusters(
            *class_case(), top_k=2, pool_mult=1, keep_retrieval_order=True, query_sims="gpu"
        )
