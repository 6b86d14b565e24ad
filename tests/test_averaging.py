"""SWAD's loss-valley rule on hand-worked loss sequences, and its average against numpy."""
import numpy as np
import pytest
import torch

from embedcache.students.averaging import LossValley, SegmentMean


def _run(losses, steps_per_segment=3, **kw):
    """Feed one segment per loss; step values are distinct so the average shows which were taken."""
    valley, seg, values = LossValley(**kw), SegmentMean(), {}
    for i, loss in enumerate(losses):
        vals = [100.0 * i + k for k in range(steps_per_segment)]
        values[i] = vals
        for v in vals:
            seg.add({"w": torch.tensor([v]), "count": torch.tensor(i)})
        valley.update(seg.take(), loss)
    return valley, values


def test_valley_starts_when_the_loss_settles_and_ends_when_it_rises():
    # start at 2 (3.0 is the minimum of [3.0, 3.5, 3.2]); threshold = mean(3.0, 3.5, 3.2) * 1.5 = 4.85;
    # segments 3, 4, 5 each have a loss <= threshold in their 3-evaluation window; the window of 6 is
    # all 9.0 > 4.85, so the valley ends there.
    losses = [5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 9.0, 9.0, 9.0]
    valley, values = _run(losses, n_converge=3, n_tolerance=3, tolerance_ratio=0.5)
    state = valley.result()
    assert valley.chosen == [2, 3, 4, 5] and valley.dead
    expected = np.mean([v for i in (2, 3, 4, 5) for v in values[i]])
    np.testing.assert_allclose(state["w"].numpy(), [expected])
    assert state["count"].dtype == torch.int64  # integer buffers are carried, not averaged


def test_valley_walks_back_and_flushes_at_the_end():
    # n_tolerance 5 > n_converge 3: at convergence (start 2, threshold 4.85) the walk back takes
    # segment 1 (4.0) and stops at 0 (10.0); segments 3 and 4 are flushed when training ends.
    valley, values = _run([10.0, 4.0, 3.0, 3.5, 3.2], n_converge=3, n_tolerance=5, tolerance_ratio=0.5)
    state = valley.result()
    assert valley.chosen == [1, 2, 3, 4]
    np.testing.assert_allclose(state["w"].numpy(), [np.mean([v for i in (1, 2, 3, 4) for v in values[i]])])


def test_no_valley_while_the_loss_keeps_falling():
    valley, values = _run([5.0, 4.0, 3.0, 2.0, 1.0], n_converge=3, n_tolerance=3)
    assert valley.result() is None and valley.chosen == []
    last = valley.last_segment()  # what SWAD's code keeps then (converge_Q[-1]): the last segment's average
    np.testing.assert_allclose(last["w"].numpy(), [np.mean(values[4])])
    assert int(last["count"]) == 4 and LossValley().last_segment() is None


def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    losses = [5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 9.0, 9.0, 9.0]
    full, _ = _run(losses, n_converge=3, n_tolerance=3, tolerance_ratio=0.5)
    part, _ = _run(losses[:5], n_converge=3, n_tolerance=3, tolerance_ratio=0.5)
    torch.save(part.state_dict(), tmp_path / "v.pt")
    resumed = LossValley()
    resumed.load_state_dict(torch.load(tmp_path / "v.pt", weights_only=True))
    seg = SegmentMean()
    for i, loss in enumerate(losses[5:], start=5):
        for k in range(3):
            seg.add({"w": torch.tensor([100.0 * i + k]), "count": torch.tensor(i)})
        resumed.update(seg.take(), loss)
    assert resumed.chosen == [2, 3, 4, 5]
    torch.testing.assert_close(resumed.result()["w"], full.result()["w"])


def test_a_negative_loss_gets_its_tolerance_above_the_plateau():
    """vl2v_adip's loss is a negative cosine: mean * (1 + ratio) put the threshold below the plateau,
    so a flat valley ended at its first judged segment. The tolerance is ratio * |mean| above it."""
    plateau = [-0.50, -0.60, -0.63, -0.62, -0.625, -0.63, -0.628, -0.631, -0.629, -0.63]
    valley, _ = _run(plateau, n_converge=3, n_tolerance=3, tolerance_ratio=0.3)
    valley.result()
    # start 2 (the minimum of -0.63, -0.62, -0.625), threshold -0.625 + 0.3 * 0.625 = -0.4375: every segment from the start
    assert valley.chosen == list(range(2, 10)) and valley.threshold == pytest.approx(-0.4375)
    # the same rule as before for a positive loss: mean(3.0, 3.5, 3.2) * 1.5 = 4.85
    positive, _ = _run([5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 9.0, 9.0, 9.0], n_converge=3, n_tolerance=3, tolerance_ratio=0.5)
    assert positive.threshold == pytest.approx(4.85)
