"""Protocols on synthetic data whose answer is known by construction."""
import warnings

import numpy as np
import pytest

from embedcache.evaluate.protocols import PROTOCOLS, EvalData, episode, few_shot, lodo, open_vocab, tip_adapter_logits


def _data(noise=0.05, shuffle=False, n=600, c=6, d=16, seed=0):
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(c, d))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    labels = rng.integers(0, c, n)
    emb = text[labels] + noise * rng.normal(size=(n, d))
    if shuffle:
        labels = rng.permutation(labels)
    domains = np.array(["d0", "d1", "d2"])[np.arange(n) % 3]
    views = text[labels][:, None] + noise * rng.normal(size=(n, 3, d))  # the teacher's 3 views of each image
    return EvalData(emb, labels, domains, np.ones(n, bool), text, [f"c{i}" for i in range(c)], teacher_views=views)


def _value(df, split, domain="avg", metric="top1"):
    sel = df[(df.split == split) & (df.domain == domain) & (df.metric == metric)]
    assert len(sel) == 1, df
    return float(sel.value.iloc[0])


def test_gzsl_of_a_run_that_held_out_a_domain_compares_like_with_like():
    """A run holding out domain d1: generalised zero-shot's seen side (the images it never trained on)
    was d1's seen-class images and its validation rows together, labelled "all", while its unseen side
    held every domain, and the harmonic mean mixed the two (a trial). Now each held-out domain and the
    training domains are scored apart, both sides from the same domains; brute force agrees."""
    d = _data(noise=0.7, seed=3)
    d.holdout_domains = ["d1"]
    d.val_idx = np.flatnonzero((np.arange(600) % 3 != 1) & (np.arange(600) % 4 == 0))  # in the training domains
    d.test_idx = np.flatnonzero(d.domains == "d1")
    df = open_vocab(d, seen_classes=[0, 1, 2])
    gz = df[df.split.str.startswith("gzsl")]
    assert set(gz.domain) == {"d1", "training_domains"}
    guess = np.argmax(d.emb @ d.class_emb.T, axis=1)  # among every label
    seen, held = np.isin(d.labels, [0, 1, 2]), d.domains == "d1"
    val = np.zeros(600, bool)
    val[d.val_idx] = True
    for domain, s_rows, u_rows in (("d1", seen & held, ~seen & held), ("training_domains", seen & val, ~seen & ~held)):
        a, b = (float(np.mean(guess[r] == d.labels[r])) for r in (s_rows, u_rows))
        assert _value(df, "gzsl_seen", domain) == pytest.approx(a) and _value(df, "gzsl_unseen", domain) == pytest.approx(b)
        assert _value(df, "gzsl_harmonic", domain) == pytest.approx(2 * a * b / (a + b))
        n = gz[(gz.domain == domain) & (gz.metric == "top1")].set_index("split").n
        assert (n["gzsl_seen"], n["gzsl_unseen"]) == (s_rows.sum(), u_rows.sum())
    d.val_idx = np.zeros(0, np.int64)  # Li et al.'s val_fraction=0: the training domains' seen side is empty
    with pytest.warns(UserWarning, match="every seen-class image of the training domains .* gzsl_harmonic on training_domains left out"):
        df = open_vocab(d, seen_classes=[0, 1, 2])
    got = set(zip(df.split, df.domain))
    assert ("gzsl_harmonic", "d1") in got and ("gzsl_unseen", "training_domains") in got
    assert ("gzsl_seen", "training_domains") not in got and ("gzsl_harmonic", "training_domains") not in got


def test_lodo_perfect_and_chance():
    df = lodo(_data())
    assert set(df.domain) == {"d0", "d1", "d2", "avg"} and set(df.split) == {"zero_shot"}
    assert _value(df, "zero_shot") == 1.0 and _value(df, "zero_shot", metric="mean_per_class") == 1.0
    chance = _value(lodo(_data(shuffle=True)), "zero_shot")
    assert 0.08 < chance < 0.27  # 1/6 expected


def test_lodo_with_a_held_out_domain():
    d = _data()
    d.val_idx = np.arange(0, 600, 5)
    df = lodo(d, holdout_domains=["d1"])
    ood = df[df.split == "out_of_domain"]
    ind = df[df.split == "in_domain"]
    assert set(ood.domain) == {"d1", "avg"} and set(ind.domain) == {"d0", "d2", "avg"}
    # in-domain counts only the validation rows of the training domains
    assert int(ind[(ind.domain == "d0") & (ind.metric == "top1")].n.iloc[0]) == int(np.sum((np.arange(0, 600, 5) % 3) == 0))


def test_lodo_of_a_run_that_held_out_no_domain_scores_only_its_validation_rows():
    d = _data(shuffle=True)
    d.val_idx = np.arange(0, 600, 4)
    d.labels[d.val_idx] = np.argmax(d.emb[d.val_idx] @ d.class_emb.T, axis=1)  # right on validation rows only
    df = lodo(d)
    assert set(df.split) == {"in_domain"} and _value(df, "in_domain") == 1.0  # never the trained rows
    assert df[df.domain != "avg"].query("metric == 'top1'").n.sum() == len(d.val_idx)
    from embedcache.evaluate.protocols import rows_read
    assert np.array_equal(rows_read(["lodo"], d.domains, d.ok, [], d.val_idx), d.val_idx)
    d.val_idx = np.array([], dtype=np.int64)  # every image trained on: nothing unseen to score
    with pytest.raises(ValueError, match="held out no domain and kept no validation rows"):
        lodo(d)


def test_open_vocab_restricts_labels_and_reports_harmonic_mean():
    d = _data(noise=0.6, seed=1)
    df = open_vocab(d, seen_classes=[0, 1, 2])
    assert set(df.split) == {"unseen_zero_shot", "gzsl_seen", "gzsl_unseen", "gzsl_harmonic"}
    a, b = _value(df, "gzsl_seen", "all"), _value(df, "gzsl_unseen", "all")
    assert _value(df, "gzsl_harmonic", "all") == pytest.approx(2 * a * b / (a + b))
    # fewer candidate labels can only help: zero-shot over unseen labels >= generalised unseen accuracy
    assert _value(df, "unseen_zero_shot", "all") >= b
    assert _value(open_vocab(_data(), seen_classes=[0, 1, 2]), "unseen_zero_shot", "all") == 1.0
    with pytest.raises(ValueError, match="at least one unseen class"):
        open_vocab(_data(), seen_classes=list(range(6)))


def test_few_shot_perfect_and_too_few_images():
    df = few_shot(_data(), shots=5, episodes=2, seen_classes=[0, 1, 2])
    mean = df[df.episode == -1]
    assert set(mean.split) == {"prototype", "tip_adapter", "li_retrieval", "text_only"} and (mean.value == 1.0).all()
    small = _data(n=30)
    with pytest.raises(ValueError, match="fewer than 5 shots \\+ 1 to test; few_shot needs 6 usable images in every "
                                         "unseen class: use --shots 3 or fewer, or hold out other classes \\(--seen-classes"):
        few_shot(small, shots=5, seen_classes=[0, 1, 2])  # (every class was short: holding others out could not help)


def test_one_unseen_class_is_said_to_score_100_by_construction():
    """A split holding one class out printed 100.0 for unseen_zero_shot, prototype and tip_adapter with no
    word (the collapse warning needs two classes to tell apart; a trial)."""
    d = _data(noise=0.6, seed=1)
    with pytest.warns(UserWarning, match=r"open_vocab: one unseen class \('c5'\): unseen_zero_shot, among the unseen "
                                         r"labels only, is 100% by construction; hold two or more classes out"):
        df = open_vocab(d, seen_classes=[0, 1, 2, 3, 4])
    assert _value(df, "unseen_zero_shot", "all") == 1.0
    with pytest.warns(UserWarning, match=r"few_shot: one unseen class \('c5'\): every query is given it"):
        few_shot(d, shots=5, episodes=1, seen_classes=[0, 1, 2, 3, 4])


def test_tip_adapter_keys_are_the_teachers_views_of_the_support_images():
    """Li et al.'s retrieval: the student's embedding of a query against the teacher's embeddings of
    the support images (PAPERS.md; each the mean of its views, as Tip-Adapter's cache averages a shot's
    augmentations), not the student's own support embeddings."""
    d = _data(noise=0.6, d=8, seed=3)
    d.teacher_views = np.random.default_rng(9).normal(size=d.teacher_views.shape)  # keys unlike the student
    unseen = np.array([3, 4, 5])
    df = few_shot(d, shots=5, episodes=1, seen_classes=[0, 1, 2], beta=1.0, alpha=50.0)
    support, query = episode(d.labels, d.ok, unseen, 5, 0, 0, d.classes)
    un = lambda x: x / np.linalg.norm(x)  # noqa: E731
    def accuracy(keys_of, text_scale=100):
        right = 0
        for i in query:
            score = {c: text_scale * un(d.emb[i]) @ un(d.class_emb[c]) for c in unseen}
            for j in support:
                for key in keys_of(j):
                    score[d.labels[j]] += 50.0 * np.exp(-1.0 * (1 - un(d.emb[i]) @ un(key)))
            right += max(score, key=score.get) == d.labels[i]
        return right / len(query)

    got = df[(df.split == "tip_adapter") & (df.episode == 0) & (df.metric == "top1")].value.item()
    assert got == pytest.approx(accuracy(lambda j: [d.teacher_views[j].mean(0)]))
    assert got != pytest.approx(accuracy(lambda j: [d.emb[j]]))  # the student's own keys give other answers here
    assert got != pytest.approx(accuracy(lambda j: d.teacher_views[j]))  # and so does one key per view
    # Li et al.'s code: the cosine to the text unscaled, a key per view of each shot (an audit of their code)
    li = df[(df.split == "li_retrieval") & (df.episode == 0) & (df.metric == "top1")].value.item()
    assert li == pytest.approx(accuracy(lambda j: d.teacher_views[j], text_scale=1))
    assert li != pytest.approx(accuracy(lambda j: d.teacher_views[j])) and li != pytest.approx(got)
    # text_only: the same queries by the unseen classes' text alone, Tip-Adapter without its cache
    text = df[(df.split == "text_only") & (df.episode == 0) & (df.metric == "top1")].value.item()
    assert text == pytest.approx(accuracy(lambda j: [])) and text != pytest.approx(got)
    no_cache = few_shot(d, shots=5, episodes=1, seen_classes=[0, 1, 2], beta=1.0, alpha=0.0)
    assert no_cache[(no_cache.split == "tip_adapter") & (no_cache.episode == 0) & (no_cache.metric == "top1")].value.item() \
        == pytest.approx(text)
    d.teacher_views = None
    with pytest.raises(ValueError, match="teacher's embeddings of the support images"):
        few_shot(d, shots=5, episodes=1, seen_classes=[0, 1, 2])


@pytest.mark.parametrize("scale", [100, 1])
def test_tip_adapter_and_li_retrieval_against_a_loop(scale):
    from embedcache.evaluate.protocols import li_retrieval_logits

    rng = np.random.default_rng(4)
    q, keys, t = rng.normal(size=(5, 8)), rng.normal(size=(6, 8)), rng.normal(size=(3, 8))
    kl = np.array([0, 0, 1, 1, 2, 2])
    un = lambda x: x / np.linalg.norm(x)  # noqa: E731
    ref = np.zeros((5, 3))
    for i in range(5):
        for c in range(3):
            ref[i, c] = scale * un(q[i]) @ un(t[c]) + sum(np.exp(-5.5 * (1 - un(q[i]) @ un(keys[j])))
                                                          for j in range(6) if kl[j] == c)
    logits = tip_adapter_logits if scale == 100 else li_retrieval_logits
    np.testing.assert_allclose(logits(q, keys, kl, t), ref, rtol=1e-4)


def test_protocol_registry():
    assert PROTOCOLS.names() == ["distill", "few_shot", "lodo", "open_vocab", "per_class"]


def test_per_class_and_distill():
    d = _data()
    d.teacher = d.emb.copy()
    pc = PROTOCOLS.get("per_class")(d)
    assert len(pc) == 6 and (pc.value == 1.0).all() and pc.n.sum() == 600
    ds = PROTOCOLS.get("distill")(d, max_rows=300)
    vals = dict(zip(ds.metric, ds.value))
    assert vals["m_rel"] == 1.0 and vals["m_neigh@10"] == 1.0 and vals["m_vlalign@5"] == 0.0
    assert vals["teacher_student_cosine"] == pytest.approx(1.0)
    from embedcache.evaluate.metrics import text_separability
    assert vals["text_pairwise_cosine"] == pytest.approx(text_separability(d.class_emb))
    d.teacher = None  # without a teacher, only the text metric
    assert PROTOCOLS.get("distill")(d).metric.tolist() == ["text_pairwise_cosine"]


def test_classifier_scores_replace_nearest_text():
    d = _data()
    d.scores = np.zeros((len(d.labels), 6))
    d.scores[np.arange(len(d.labels)), d.labels] = 1.0  # a perfect classifier...
    d.scores[:, 5] = -np.inf  # ...that never saw class 5 (-inf: no output for it)
    assert _value(lodo(d), "zero_shot") == pytest.approx(1 - np.mean(d.labels == 5), abs=1e-9)
    d.emb = -d.emb  # embeddings are ignored when scores exist
    assert _value(lodo(d), "zero_shot") == pytest.approx(1 - np.mean(d.labels == 5), abs=1e-9)
    # a classifier has no zero-shot answer over classes it never trained on (it gave the first unseen
    # class, and the share of that class as its "accuracy"): generalised rows only, unseen accuracy 0
    d.scores[:, 3:] = -np.inf
    with pytest.warns(UserWarning, match="never predicts an unseen class: gzsl_unseen and gzsl_harmonic are 0 by "
                                         "construction"):  # said, not only documented (a trial)
        ov = open_vocab(d, seen_classes=[0, 1, 2])
    assert set(ov.split) == {"gzsl_seen", "gzsl_unseen", "gzsl_harmonic"} and _value(ov, "gzsl_unseen", "all") == 0.0
    from embedcache.evaluate.protocols import _predict
    with pytest.raises(ValueError, match="linear classifier over its training classes"):
        _predict(d, np.arange(10), [3, 4, 5])
    d.scores[:, 3:5] = 0.0  # one unseen class: only "never predicts" is said, not the 100% of a row left out (a trial)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        open_vocab(d, seen_classes=[0, 1, 2, 3, 4])
    assert [str(w.message)[:40] for w in said] == ["open_vocab: this run predicts with a lin"], [str(w.message) for w in said]


def test_the_class_split_halves_as_li_et_al_do():
    """Li et al.'s halves: Birds 100/100, Flowers 51/51, Food 51/50, Cars 98/98 (the larger half
    trains); SUN's 200/197 is no fraction of 397 (train_classes gives exact lists)."""
    from embedcache.evaluate.protocols import seeded_class_split

    for c, seen in ((200, 100), (102, 51), (101, 51), (196, 98), (7, 4), (397, 199)):
        got = seeded_class_split(c, 0.5, seed=1)
        assert len(got) == seen and len(set(got)) == seen and got.max() < c, c
    assert len(seeded_class_split(45, 0.3)) == 32  # 31.5 rounds up, though 45 * 0.7 is 31.4999... in floats
    assert len(seeded_class_split(7, 0.01)) == 6  # at least one class stays unseen
    with pytest.warns(UserWarning, match="unseen_fraction=0.99 of 7 classes leaves no seen class; one is kept seen"):
        assert len(seeded_class_split(7, 0.99)) == 1  # and at least one is seen, said (it was silent: a fuzzing trial)
    with pytest.raises(ValueError, match="at least 2 classes"):
        seeded_class_split(1)


def _noisy_run(seed=3):
    """A run that held out domain d1 and classes 4, 5, on embeddings noisy enough to confuse classes."""
    d = _data(noise=0.9, seed=seed)
    d.holdout_domains, d.seen_classes = ["d1"], [0, 1, 2, 3]
    train = np.isin(d.labels, d.seen_classes) & (d.domains != "d1")
    d.val_idx = np.flatnonzero(train)[::4]
    d.test_idx = np.flatnonzero(~train)
    return d


def _among(d, rows, labels):
    """Brute force: the nearest class text among ``labels`` for each row."""
    labels = np.asarray(labels)
    return labels[np.argmax(d.emb[rows] @ d.class_emb[labels].T, axis=1)]


def test_a_run_that_held_out_classes_is_scored_by_lodo_on_its_classes_among_their_labels():
    """lodo scored a class-held-out run over every label and every class: in-domain 0% on the rows
    its own validation scored 46% (it predicted a class it never trained on)."""
    d = _noisy_run()
    df = lodo(d)
    seen = np.asarray(d.seen_classes)
    for split, dom in (("in_domain", "d0"), ("out_of_domain", "d1")):
        rows = np.flatnonzero(d.ok & (d.domains == dom) & np.isin(d.labels, seen))
        if split == "in_domain":
            rows = np.intersect1d(rows, d.val_idx)
        want = np.mean(_among(d, rows, seen) == d.labels[rows])
        got = df[(df.split == split) & (df.domain == dom) & (df.metric == "top1")]
        assert int(got.n.iloc[0]) == len(rows) and float(got.value.iloc[0]) == pytest.approx(want)


def test_per_class_scores_each_scope_as_the_runs_other_protocols_do():
    """per_class pooled held-out-domain and validation rows, and scored unseen classes among every label
    (Li et al. score them among the unseen labels only)."""
    from embedcache.evaluate.protocols import per_class

    d = _noisy_run(seed=4)
    d.test_idx = np.union1d(d.test_idx, np.flatnonzero((d.domains == "d0") & np.isin(d.labels, d.seen_classes))[:7])
    df = per_class(d)
    assert set(df.domain) == {"out_of_domain", "in_domain", "unseen_zero_shot"}
    seen, unseen = np.asarray(d.seen_classes), np.array([4, 5])
    # a training domain's rows of a dataset's own test split are in domain, beside the validation rows
    own_test = np.flatnonzero((d.domains == "d0") & np.isin(d.labels, d.seen_classes))[:7]
    scopes = {"out_of_domain": (d.test_idx[np.isin(d.labels[d.test_idx], seen) & (d.domains[d.test_idx] == "d1")], seen),
              "in_domain": (np.union1d(d.val_idx, own_test), seen), "unseen_zero_shot": (d.test_idx[np.isin(d.labels[d.test_idx], unseen)], unseen)}
    for scope, (rows, labels) in scopes.items():
        pred = _among(d, rows, labels)
        for c in np.unique(d.labels[rows]):
            m = d.labels[rows] == c
            got = df[(df.domain == scope) & (df.class_name == f"c{c}")]
            assert int(got.n.iloc[0]) == m.sum() and float(got.value.iloc[0]) == pytest.approx(np.mean(pred[m] == c))


def test_per_class_of_a_classifier_run_with_nothing_it_can_answer_is_one_line():
    """A linear-classifier run that held out classes and kept no validation rows: every row it did not
    train on is of a class it cannot answer (pd.concat of nothing raised a bare ValueError)."""
    from embedcache.errors import EvaluationError
    from embedcache.evaluate.protocols import per_class

    d = _data()
    d.seen_classes, d.val_idx = [0, 1, 2, 3], np.zeros(0, np.int64)
    d.test_idx = np.flatnonzero(~np.isin(d.labels, d.seen_classes))
    d.scores = np.where(np.arange(6) < 4, 1.0, -np.inf) * np.ones((len(d.labels), 6))
    with pytest.raises(EvaluationError, match="per_class has nothing to score"):
        per_class(d)


def test_a_model_that_predicts_one_class_is_named_collapsed():
    """A student that had learned the teacher's mean embedding answered 'person' for every image: its
    top-1 was each domain's share of person images, read as a result with no word said."""
    import warnings

    d = _data()
    d.emb = np.repeat(d.class_emb[2:3], len(d.labels), axis=0)  # every image nearest class c2
    with pytest.warns(UserWarning, match=r"zero_shot on d0: the model predicts 'c2' for 100% of the 200 images \(a "
                                         r"collapsed model: its top-1 is that class's share of them\)"):
        df = lodo(d)
    share = float(np.mean(d.labels[d.domains == "d0"] == 2))
    assert _value(df, "zero_shot", "d0") == pytest.approx(share)
    # kept in the results too, so the report says it (a warning scrolls away): the share and the class
    said = df[(df["metric"] == "collapsed_share") & (df["domain"] == "d0")]
    assert said[["value", "class_name"]].values.tolist() == [[1.0, "c2"]]
    assert not ((df["metric"] == "collapsed_share") & (df["domain"] == "avg")).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model that answers: no warning
        assert "collapsed_share" not in set(lodo(_data())["metric"])
        lodo(_data(shuffle=True))  # at chance but not collapsed


def test_a_collapse_over_domains_each_too_small_to_judge_is_named():
    """In-domain validation of 8 images per domain, 23 of 24 answered 'person': below chance, with no warning,
    each domain under the 10 images judged alone (a trial). The split's images over its domains are judged."""
    import warnings

    d = _data(n=24)
    d.val_idx = np.arange(24)  # every image a validation row of its (training) domain
    d.holdout_domains = []
    d.emb = np.repeat(d.class_emb[2:3], 24, axis=0)
    d.emb[0] = d.class_emb[3]  # one answered otherwise: 23 of 24 'c2'
    with pytest.warns(UserWarning, match=r"in_domain over its 3 domains: the model predicts 'c2' for 96% of the 24 "
                                         r"images"):
        df = lodo(d)
    said = df[df["metric"] == "collapsed_share"]
    assert said[["split", "domain", "class_name", "n"]].values.tolist() == [["in_domain", "avg", "c2", 24]]
    assert said["value"].iloc[0] == pytest.approx(23 / 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model that answers, over the same small domains: no warning
        d2 = _data(n=24)
        d2.val_idx, d2.holdout_domains = np.arange(24), []
        assert "collapsed_share" not in set(lodo(d2)["metric"])


def test_a_collapse_on_a_small_domain_is_named_too():
    """A domain of 13 sketches, every one answered 'horse', was not named: groups under 20 images were
    never judged, and the README said no minimum (a trial)."""
    from embedcache.evaluate.protocols import COLLAPSE_MIN_IMAGES, collapsed_class

    classes = ["dog", "horse", "guitar", "person"]
    labels = np.arange(13) % 4  # mixed classes
    assert collapsed_class(np.full(13, 1), labels, classes) == ("horse", 1.0)
    assert collapsed_class(labels, labels, classes) is None  # a model that answers
    # two balanced classes, every image answered with one: its 50% was said nowhere (a trial)
    assert collapsed_class(np.zeros(48, int), np.arange(48) % 2, ["circle", "cross"]) == ("circle", 1.0)
    assert collapsed_class(np.zeros(48, int), (np.arange(48) % 4 == 0).astype(int), ["circle", "cross"]) is None  # 75% one
    few = COLLAPSE_MIN_IMAGES - 1  # too few images to tell a collapse from chance: not judged
    assert collapsed_class(np.full(few, 1), np.arange(few) % 4, classes) is None


def test_warnings_said_before_a_failure_keep_the_model_they_are_about():
    """A protocol that warns (a collapsed model) and then fails: the warning is still said, named."""
    import warnings

    from embedcache.evaluate.protocols import named_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="later"):
            with named_warnings("run r7"):
                warnings.warn("zero_shot on d0: the model predicts 'c1' for 99% of the 40 images")
                raise ValueError("a later protocol failed")
    assert [str(w.message) for w in caught] == ["run r7: zero_shot on d0: the model predicts 'c1' for 99% of the 40 images"]


def test_warnings_turned_errors_never_replace_the_blocks_own_error():
    import warnings

    from embedcache.evaluate.protocols import named_warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # -W error, or pytest's filterwarnings=error
        with pytest.raises(ZeroDivisionError):
            with named_warnings("run x"):
                warnings.warn("rows left out")
                1 / 0


def test_m_neigh_is_left_out_when_every_other_image_would_be_a_neighbour():
    """With fewer images than k + 2, k was cut to n - 1: every other image was a neighbour of each in
    both spaces and M_neigh was 1.0 by construction, shown beside real values."""
    d = _data()
    rng = np.random.default_rng(0)
    d.teacher = rng.normal(size=d.emb.shape).astype(np.float32)  # unrelated to the student: M_neigh would be low
    with pytest.warns(UserWarning, match=r"m_neigh@10 is left out: 8 images scored leave no more than 7 others"):
        ds = PROTOCOLS.get("distill")(d, max_rows=8)
    assert not any(m.startswith("m_neigh") for m in ds.metric) and "m_rel" in set(ds.metric)
    ds = PROTOCOLS.get("distill")(d, max_rows=12, k_neigh=10)
    assert "m_neigh@10" in set(ds.metric)


def test_a_collapse_in_one_episode_is_not_said_of_the_run(tmp_path):
    """One of three few-shot episodes collapsed: the episodes' mean averaged the collapsed_share rows of
    the episodes that had one (that one), with no class, and the report said the run answered '' and
    'circle' for 96% of the images."""
    import pandas as pd

    from embedcache.evaluate.protocols import episode_mean
    from embedcache.evaluate.report import write_report

    rows = [{"split": "prototype", "domain": "all", "metric": m, "value": v, "n": 48, "episode": ep}
            for ep in range(3) for m, v in (("top1", 0.5), ("mean_per_class", 0.5))]
    rows.append({"split": "prototype", "domain": "all", "metric": "collapsed_share", "value": 0.96, "n": 48,
                 "episode": 2, "class_name": "circle"})
    df = pd.DataFrame(rows)
    mean = episode_mean(df)
    assert set(mean.metric) == {"top1", "mean_per_class"} and set(mean.n) == {144}
    results = pd.concat([df, mean.assign(domain="all", episode=-1)], ignore_index=True).assign(
        run="r", recipe="ce", student="s", replicate=0, protocol="few_shot")
    write_report(results, str(tmp_path / "rep"))
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "collapsed:" not in text  # said of the episode it happened in, not of the run
    assert ("collapsed episodes: ce / s on all answers 'circle' for 96% of the images in 1 of its 3 episodes"
            in text), text


def test_a_prototype_weighs_each_shot_alike_whatever_its_norm():
    """A student's embeddings are not unit vectors (norms of 4.9 to 9.1 in a trial): the prototype was the
    raw mean of its shots, so a shot of larger norm outweighed the others, while the teacher's (unit)
    shots counted alike. Each shot is now a unit vector in its class's prototype; brute force agrees."""
    d = _data(noise=0.9, seed=5)
    rng = np.random.default_rng(1)
    d.emb = d.emb * rng.uniform(0.2, 20.0, (len(d.emb), 1))  # norms far apart, as a student's
    df = few_shot(d, shots=5, episodes=3, seen_classes=[0, 1, 2])
    unseen = np.array([3, 4, 5])
    unit = d.emb / np.linalg.norm(d.emb, axis=1, keepdims=True)
    for ep in range(3):
        support, query = episode(d.labels, d.ok, unseen, 5, 0, ep, d.classes)
        protos = np.stack([unit[support][d.labels[support] == c].mean(0) for c in unseen])
        protos /= np.linalg.norm(protos, axis=1, keepdims=True)
        want = np.mean(unseen[np.argmax(unit[query] @ protos.T, axis=1)] == d.labels[query])
        got = df[(df.split == "prototype") & (df.episode == ep) & (df.metric == "top1")].value
        assert float(got.iloc[0]) == pytest.approx(want)
    raw = np.stack([d.emb[support][d.labels[support] == c].mean(0) for c in unseen])  # the old prototype differs here
    assert np.mean(unseen[np.argmax(unit[query] @ (raw / np.linalg.norm(raw, axis=1, keepdims=True)).T, axis=1)]
                   == d.labels[query]) != pytest.approx(want)
