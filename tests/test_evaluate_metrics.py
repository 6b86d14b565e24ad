"""The label index against brute force, and every metric on hand-worked cases."""
import numpy as np
import pytest

from embedcache.evaluate.index import LabelIndex
from embedcache.evaluate.metrics import (m_neigh, m_rel, m_vlalign, mean_per_class, per_group, teacher_student_cosine,
                              text_separability, top1, topk)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("n,c,d", [(50, 7, 16), (1000, 200, 32)])
def test_faiss_equals_brute_force(n, c, d):
    rng = np.random.default_rng(0)
    q, lab = rng.normal(size=(n, d)), rng.normal(size=(c, d)) * rng.uniform(0.5, 2, (c, 1))
    scores, ids = LabelIndex(lab).search(q, k=5)
    ref = _unit(q) @ _unit(lab).T
    np.testing.assert_array_equal(ids, np.argsort(-ref, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores, np.sort(ref, axis=1)[:, ::-1][:, :5], atol=1e-5)
    np.testing.assert_array_equal(LabelIndex(lab).predict(q), ref.argmax(1))


def test_subset_answers_in_its_own_ids():
    rng = np.random.default_rng(1)
    lab, q = rng.normal(size=(10, 8)), rng.normal(size=(40, 8))
    sub = [7, 2, 5]
    got = LabelIndex.subset(lab, sub).predict(q)
    ref = np.array([2, 5, 7])[np.argmax(_unit(q) @ _unit(lab[[2, 5, 7]]).T, axis=1)]
    np.testing.assert_array_equal(got, ref)
    assert set(got) <= set(sub)


def test_index_errors():
    with pytest.raises(ValueError, match="label subset is empty"):
        LabelIndex.subset(np.ones((3, 4)), [])
    with pytest.raises(ValueError, match="dimension 5, the labels 4"):
        LabelIndex(np.ones((3, 4))).search(np.ones((2, 5)))
    with pytest.raises(ValueError, match="empty set is undefined"):
        top1(np.array([]), np.array([]))


def test_accuracies_by_hand():
    pred, lab = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0])
    assert top1(pred, lab) == pytest.approx(4 / 6)
    # class 0: 1/2, class 1: 1/2, class 2: 2/2
    assert mean_per_class(pred, lab) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert topk(np.array([[1, 0], [2, 0], [1, 2]]), np.array([0, 1, 2])) == pytest.approx(2 / 3)
    tab = per_group(pred, lab, np.array(list("aabbbb")), "domain")
    assert tab.to_dict("list") == {"domain": ["a", "b"], "top1": [0.5, 0.75], "n": [2, 4]}


def test_per_class_counts_in_one_pass_equal_a_loop_over_the_classes():
    """mean_per_class, fewest_images and holdout_tag went over every row (or every seen id) once per class: seconds
    per call at 10,000 classes (a trial). Their one-pass forms against the plain loops."""
    from embedcache.evaluate.protocols import fewest_images
    from embedcache.evaluate.results import holdout_tag

    rng = np.random.default_rng(5)
    lab, pred, ok = rng.integers(3, 300, 20000), rng.integers(0, 300, 20000), rng.random(20000) > 0.2
    present = np.unique(lab)
    assert mean_per_class(pred, lab) == float(np.mean([np.mean(pred[lab == c] == c) for c in present]))
    some = np.sort(rng.choice(present, 40, replace=False))
    counts = {int(c): int((ok & (lab == c)).sum()) for c in some}
    assert fewest_images(lab, ok, some) == (min(counts, key=counts.get), min(counts.values()))
    names = [f"c{i}" for i in range(300)]
    seen = rng.choice(300, 120, replace=False)
    assert holdout_tag(classes=names, seen=seen) == "unseen: " + ",".join(n for i, n in enumerate(names) if i not in set(seen))


def test_distillation_metrics_by_hand():
    rng = np.random.default_rng(2)
    t = rng.normal(size=(20, 6))
    assert m_rel(2 * t, t) == 1.0 and m_neigh(t, t, k=4) == 1.0
    assert teacher_student_cosine(3 * t, t) == pytest.approx(1.0)
    # M_rel: rows shuffled, so each student is nearest the teacher of another image
    perm = np.roll(np.arange(20), 1)
    assert m_rel(t[perm], t) == 0.0
    # M_vlalign: labels = axes; teacher order 0 > 1 > 2
    labels = np.eye(3)
    tt = np.array([[0.9, 0.5, 0.1]])
    assert m_vlalign(tt, tt, labels, k=3) == 0.0
    assert m_vlalign(np.array([[0.1, 0.5, 0.9]]), tt, labels, k=3) == 1.0      # fully reversed
    assert m_vlalign(np.array([[0.5, 0.9, 0.1]]), tt, labels, k=3) == pytest.approx(1 / 3)  # one swap
    assert text_separability(np.eye(4)) == pytest.approx(0.0)
    assert text_separability(np.ones((3, 5))) == pytest.approx(1.0)


def test_m_neigh_against_brute_force():
    rng = np.random.default_rng(3)
    s, t, k = rng.normal(size=(15, 4)), rng.normal(size=(15, 4)), 3
    def knn(x, i):
        sims = [(float(_unit(x)[i] @ _unit(x)[j]), j) for j in range(len(x)) if j != i]
        return {j for _, j in sorted(sims, reverse=True)[:k]}
    ref = np.mean([len(knn(s, i) & knn(t, i)) / k for i in range(15)])
    assert m_neigh(s, t, k) == pytest.approx(ref)
