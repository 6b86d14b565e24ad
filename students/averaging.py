"""SWAD's loss-valley weight averaging (Cha et al., NeurIPS 2021), as VL2V-ADiP reports with.

Weights are averaged densely within each evaluation interval (a *segment*). When the validation
loss has not improved for ``n_converge`` evaluations, the valley starts at the oldest of those
segments, and the threshold is (1 + tolerance_ratio) x their mean loss; earlier segments still
under the threshold (within the last ``n_tolerance``) are taken too. After that, a segment is
added once ``n_tolerance`` evaluations have passed since it ended, unless every loss in that
window exceeds the threshold: then the valley has ended and averaging stops for good. At the end
of training, segments not yet aged out are added by the same rule over the windows that exist.
The result is the mean of the chosen segments' weights, each segment weighed by its steps (SWAD's code
weighs each segment once: the same where segments are equally long, as all but a run's shorter last one
are). BatchNorm statistics are averaged too, then recomputed (``Trainer.refresh_bn``) unless frozen: SWAD's
code averages parameters alone, its statistics frozen by default or recomputed. The loss is the validation
cross-entropy of the model's predictions (``train.prediction_ce``), as DomainBed's evaluator gives
it. The released SWAD code (as VL2V-ADiP ships it) differs at the valley's start only: its walk back
leaves out the earliest segment still under the threshold, an off-by-one not copied here. Everything
here is tensors, ints and floats, so it checkpoints with ``torch.save`` and loads with
``weights_only=True``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from embedcache.registry import Registry

State = Dict[str, torch.Tensor]
AVERAGING = Registry("weight averaging")


def _is_avg(t: torch.Tensor) -> bool:
    return t.is_floating_point()  # integer buffers (BatchNorm's num_batches_tracked) keep the last value


class SegmentMean:
    """Running mean of a model's state over the steps of one segment."""

    def __init__(self) -> None:
        self.sum: Optional[State] = None
        self.n = 0

    def add(self, state: State) -> None:
        if self.sum is None:
            self.sum = {k: (v.detach().double().clone() if _is_avg(v) else v.detach().clone()) for k, v in state.items()}
        else:
            for k, v in state.items():
                if _is_avg(v):
                    self.sum[k] += v.detach().double()
                else:
                    self.sum[k] = v.detach().clone()
        self.n += 1

    def take(self) -> Optional[Dict]:
        """The finished segment {"sum", "n"} (sums, not means, so segments combine by count), and reset."""
        if self.n == 0:
            return None
        seg = {"sum": {k: v.cpu() for k, v in self.sum.items()}, "n": self.n}
        self.sum, self.n = None, 0
        return seg


class LossValley:
    def __init__(self, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3):
        self.n_converge, self.n_tolerance, self.ratio = n_converge, n_tolerance, tolerance_ratio
        self.segments: List[Dict] = []   # {"sum", "n", "loss", "index"}, pruned to what may still be used
        self.count = 0                   # segments seen
        self.start: Optional[int] = None  # index of the first segment of the valley
        self.threshold: Optional[float] = None
        self.next_add: Optional[int] = None  # index of the next segment to judge after convergence
        self.dead = False
        self.final: Optional[Dict] = None  # {"sum", "n"}
        self.chosen: List[int] = []

    def _add(self, seg: Dict) -> None:
        if self.final is None:
            self.final = {"sum": {k: v.clone() for k, v in seg["sum"].items()}, "n": seg["n"]}
        else:
            for k, v in seg["sum"].items():
                self.final["sum"][k] = self.final["sum"][k] + v if _is_avg(v) else v.clone()
            self.final["n"] += seg["n"]
        self.chosen.append(seg["index"])

    def _by_index(self, i: int) -> Dict:
        return next(s for s in self.segments if s["index"] == i)

    def update(self, seg: Dict, loss: float) -> None:
        """Record a finished segment with the validation loss at its end."""
        if self.dead:
            return
        self.segments.append({**seg, "loss": float(loss), "index": self.count})
        self.count += 1
        keep = max(self.n_converge, self.n_tolerance)
        if self.start is None:
            recent = self.segments[-self.n_converge:]
            if len(recent) == self.n_converge and min(range(len(recent)), key=lambda i: recent[i]["loss"]) == 0:
                self.start = recent[0]["index"]
                mean = sum(s["loss"] for s in recent) / len(recent)
                # Cha et al.'s mean * (1 + ratio) for a positive loss; above the plateau for a negative one
                # too (vl2v_adip's -cos: mean * (1 + ratio) fell below it and ended every valley at once)
                self.threshold = mean + self.ratio * abs(mean)
                earlier = [s for s in self.segments[-keep:] if s["index"] < self.start]
                back = []
                for s in reversed(earlier):  # walk back while still under the threshold
                    if s["loss"] > self.threshold:
                        break
                    back.append(s)
                for s in reversed(back):
                    self._add(s)
                self._add(self._by_index(self.start))
                self.next_add = self.start + 1
        else:
            self._age_out(final=False)
        # keep the last `keep` segments (convergence test, walk back) and every one still to be judged
        first = self.count - keep if self.next_add is None else min(self.count - keep, self.next_add)
        self.segments = [s for s in self.segments if s["index"] >= first]

    def _age_out(self, final: bool) -> None:
        while not self.dead and self.next_add is not None and self.next_add < self.count:
            window = [s for s in self.segments if self.next_add <= s["index"] < self.next_add + self.n_tolerance]
            if len(window) < self.n_tolerance and not final:
                return  # wait until the segment has aged n_tolerance evaluations
            if min(s["loss"] for s in window) > self.threshold:
                self.dead = True
                return
            self._add(self._by_index(self.next_add))
            self.next_add += 1

    def result(self) -> Optional[State]:
        """Mean state of the chosen segments (flushing the ones not yet aged), or None if the loss
        never settled."""
        self._age_out(final=True)
        if self.final is None:
            return None
        n = self.final["n"]
        return {k: (v / n if _is_avg(v) else v) for k, v in self.final["sum"].items()}

    def last_segment(self) -> Optional[State]:
        """Mean state of the last segment seen (what SWAD's code keeps when no valley formed), or None."""
        if not self.segments:
            return None
        last = self.segments[-1]
        return {k: (v / last["n"] if _is_avg(v) else v) for k, v in last["sum"].items()}

    def state_dict(self) -> Dict:
        return {k: getattr(self, k) for k in ("n_converge", "n_tolerance", "ratio", "segments", "count", "start",
                                                "threshold", "next_add", "dead", "final", "chosen")}

    def load_state_dict(self, d: Dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


# --- the averaging strategies a run can use (a registry) ---------------------------------------------
class Averaging:
    """What a run averages. The trainer calls ``after_step`` every step and ``at_eval`` at each
    evaluation point (with the validation loss, None without validation rows), then ``final`` once:
    a state dict to keep instead of the last weights, or None. ``describe`` goes in the summary."""
    name = "none"

    def __init__(self, model: torch.nn.Module, start_step: int, cfg: Any = None):
        self.start = start_step

    def after_step(self, step: int, model: torch.nn.Module) -> None:
        pass

    def at_eval(self, step: int, model: torch.nn.Module, val_loss: Optional[float]) -> None:
        pass

    def final(self, log=print) -> Optional[State]:
        return None

    def describe(self) -> Optional[Dict]:
        return None

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass


AVERAGING.register("none")(Averaging)


@AVERAGING.register("swa")
class SWA(Averaging):
    """Stochastic weight averaging: the mean of the weights at each evaluation point after ``start``."""
    name = "swa"

    def __init__(self, model: torch.nn.Module, start_step: int, cfg: Any = None):
        super().__init__(model, start_step, cfg)
        self.avg = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)

    def at_eval(self, step: int, model: torch.nn.Module, val_loss: Optional[float]) -> None:
        if step > self.start:
            self.avg.update_parameters(model)

    def final(self, log=print) -> Optional[State]:
        return self.avg.module.state_dict() if int(self.avg.n_averaged) > 0 else None

    def describe(self) -> Optional[Dict]:
        return {"averaged_evaluations": int(self.avg.n_averaged)}

    def state_dict(self) -> Dict:
        return {"avg": self.avg.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.avg.load_state_dict(state["avg"])


@AVERAGING.register("swad")
class SWAD(Averaging):
    """SWAD's loss valley (Cha et al. 2021): dense averages per evaluation interval, kept from where
    the validation loss settles until it rises past (1 + tolerance_ratio) x its level."""
    name = "swad"

    def __init__(self, model: torch.nn.Module, start_step: int, cfg: Any = None):
        super().__init__(model, start_step, cfg)
        self.segment = SegmentMean()
        self.valley = LossValley(cfg.n_converge, cfg.n_tolerance, cfg.tolerance_ratio)
        self.unsettled = False  # set at the end: no valley formed

    def after_step(self, step: int, model: torch.nn.Module) -> None:
        if step > self.start:
            self.segment.add(model.state_dict())

    def at_eval(self, step: int, model: torch.nn.Module, val_loss: Optional[float]) -> None:
        seg = self.segment.take()
        if seg is not None and val_loss is not None:
            self.valley.update(seg, val_loss)

    def final(self, log=print) -> Optional[State]:
        state = self.valley.result()
        if state is not None:
            log(f"SWAD averaged evaluation segments {self.valley.chosen}")
            return state
        state, self.unsettled = self.valley.last_segment(), True
        log("SWAD: the validation loss never settled; keeping " +
            ("the last segment's average, as SWAD's code does" if state is not None else "the last weights (no segment)"))
        return state

    def describe(self) -> Optional[Dict]:
        if not self.unsettled:
            return {"swad_segments": self.valley.chosen}
        return {"swad_segments": [s["index"] for s in self.valley.segments[-1:]], "swad_settled": False}

    def state_dict(self) -> Dict:
        return {"valley": self.valley.state_dict(), "segment": {"sum": self.segment.sum, "n": self.segment.n}}

    def load_state_dict(self, state: Dict) -> None:
        self.valley.load_state_dict(state["valley"])
        self.segment.sum, self.segment.n = state["segment"]["sum"], state["segment"]["n"]
