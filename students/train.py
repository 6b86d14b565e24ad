"""Training a student from a store: ``train(cfg)`` writes one run directory (see ``rundir.py``).

The run is assembled from parts with seams, each small enough to hold in one's head:
- data and providers (``data.py``, ``providers.py``): the split, the student's input for each
  (image, view) pair, and the teacher's target for exactly that view;
- the recipe (``recipes.py``): stages, each a weighted sum of registered losses;
- optimizer and schedule (``optim.py``), weight averaging (``averaging.py``), registries all;
- model selection (``Selection``): the last weights, or the best in-domain validation checkpoint
  (DomainBed's training-domain validation, as VL2V-ADiP selects: the mean of the domains' accuracies);
- checkpoints and the run directory (``rundir.py``); what names a run and may resume it (``identity.py``).

Batches are a function of (seed, step) alone and the dropout generators are reseeded every step,
so a run resumed from its checkpoint ends with the same weights as an uninterrupted one. Losses
are summed on the device and read only at evaluation and checkpoint points (no host sync per step);
a loss that becomes NaN or infinite stops the run there with a clear error, never marked done.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from embedcache import interrupt
from embedcache.config import build_config, to_dict
from embedcache.device import resolve_device
from embedcache.errors import ConfigError, DiskFullError, RunBusyError, StoreMismatchError, TrainingError
from embedcache.evaluate.metrics import nearest_label, top1
from embedcache.evaluate.protocols import collapsed_class
from embedcache.versions import library_versions
from embedcache.fileio import disk_full_error, is_disk_full, try_exclusive_lock

from .averaging import AVERAGING
from .config import (OptimConfig, SplitConfig, StudentConfig, SwadConfig, TrainConfig, check_milestones, check_trainable,
                     refuse_unread_training, selection_points, validation_steps)
from .data import StoreData, check_views_used, say_if_canvases_exceed_memory, target_views
from .headstep import HeadStep
from .losses import LOSSES, BatchContext, weighted_sum
from .features import features_key
from .models import Heads, Student, batchnorms, build_seeded, freeze_batchnorm, load_weights, without_backbone
from .optim import build_optimizer, build_scheduler, load_optimizer_state, optimizer_step
from .providers import INPUTS, TARGETS
from .identity import default_out, require_same_settings, run_name
from .notes import frozen_random_note, stage_schedule_note
from .recipes import Recipe, Stage, definition, recipe_of, stage_ends
from .rundir import RunDir, require_folder_for

__all__ = ["train", "TrainConfig", "OptimConfig", "SwadConfig", "SplitConfig", "StudentConfig", "RunResult",
           "run_name", "RunInterrupted"]


class RunInterrupted(KeyboardInterrupt):
    """A stop was requested (Ctrl-C, SIGTERM): the run saved a checkpoint at its current step, or, asked
    before this call's first step, stopped there (its last checkpoint, if any, kept)."""


@dataclass
class RunResult:
    out: str
    val_top1: Optional[float]
    steps: int
    seconds: float                      # the whole call, setup and saving included
    resumed_from: int = 0
    loop_seconds: float = 0.0           # the training steps alone, evaluations and checkpoints excluded
                                        # (what a steps/s figure should use)
    selected: Optional[Dict] = None     # which weights the run kept, and why
    already_done: bool = False          # finished before this call, which trained nothing
    val_images: Optional[int] = None    # the validation rows val_top1 is over (None: a run from before it was kept)


def set_trainable(model: Student, stage: Stage, freeze_bn: bool = False) -> None:
    """head: backbone frozen (eval mode, BN statistics fixed); backbone: projection frozen. ``freeze_bn``:
    the backbone's BatchNorm layers in eval mode even where it trains (``TrainConfig.freeze_bn``)."""
    train_backbone = stage.train in ("all", "backbone")
    for p in model.backbone.parameters():
        p.requires_grad_(train_backbone)
    for p in model.head.parameters():
        p.requires_grad_(stage.train in ("all", "head"))
    if model.classifier is not None:
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    model.train()
    if not train_backbone:
        model.backbone.eval()
    elif freeze_bn:
        freeze_batchnorm(model.backbone)


def forward(model: Student, inputs, idx, views, frozen_backbone: bool) -> Dict[str, Optional[torch.Tensor]]:
    """Student outputs for a batch: from cached features, or from images (no graph through a frozen backbone)."""
    x = inputs(idx, views)
    if inputs.kind == "features":
        return model.from_features(x)
    if frozen_backbone:
        with torch.no_grad():
            f = model.features(x)
        return model.from_features(f)
    return model(x)


def stage_loss(stage: Stage, ctx: BatchContext) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The stage's weighted sum of losses and each loss, in float32 even inside the step's bf16
    autocast (its matmuls would round class logits at tau 0.07 and flip near-tied argmaxes)."""
    with torch.autocast(ctx.s.device.type, enabled=False):
        parts = {n: LOSSES.get(n)(ctx, **stage.loss_args.get(n, {})) for n in stage.losses}
        return weighted_sum((w, parts[n]) for n, w in stage.losses.items()), parts


def add_running(running: Dict[str, torch.Tensor], parts: Dict[str, torch.Tensor]) -> None:
    """Add a step's losses to the running sums, on the device: no host sync per step."""
    for n, v in parts.items():
        v = v.detach().float()
        running[n] = running[n] + v if n in running else v


class NonFiniteOutputs(ArithmeticError):
    """The student's outputs hold NaN or inf (its weights diverged, or overflow in its forward)."""


def finite_outputs(o: Dict[str, Optional[torch.Tensor]]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in (o["emb"], o["logits"]) if v is not None)


@torch.no_grad()
def validate(model: Student, inputs, targets, data: StoreData, rows: np.ndarray, predict_with: str, text: torch.Tensor,
             stage: Optional[Stage] = None, batch: int = 256) -> Tuple[np.ndarray, Optional[float], Optional[float]]:
    """Predicted training-class index of each row (view 0: nearest class text, or the classifier); with
    ``stage``, the mean of its recipe loss over the rows and the cross-entropy of the prediction logits
    (100 cos to the class text, or the classifier's: the validation loss of DomainBed's evaluator,
    which SWAD's valley follows), both None without. Raises ``NonFiniteOutputs`` rather than
    predict from NaN or inf."""
    modes = [(m, m.training) for m in model.modules()]  # a frozen backbone must stay in eval mode after
    model.eval()
    preds, loss_sum, ce_sum = [], 0.0, 0.0
    try:  # the modes put back on a raise too: a pack's other heads train on
        for i in range(0, len(rows), batch):
            interrupt.check("validating")  # the last checkpoint stands; a resumed run redoes the steps since
            r = rows[i:i + batch]
            v0 = np.zeros(len(r), int)
            o = forward(model, inputs, r, v0, frozen_backbone=True)
            if not finite_outputs(o):
                raise NonFiniteOutputs
            preds.append(o["logits"].argmax(1).cpu().numpy() if predict_with == "linear"
                         else nearest_label(o["emb"].float().cpu().numpy(), data.text))
            if stage is not None:
                t, y = targets(r, v0)
                ce_sum += len(r) * float(prediction_ce(o, text, y, predict_with))
                loss_sum += len(r) * float(stage_loss(stage, BatchContext(o["emb"].float(), t, text, y, o["logits"]))[0])
    finally:
        for m, mode in modes:
            m.training = mode
    pred = np.concatenate(preds) if preds else np.zeros(0, int)
    n = len(rows)
    return pred, *((loss_sum / n, ce_sum / n) if stage is not None and n else (None, None))


def validation_collapse(answers: List[Tuple[np.ndarray, np.ndarray]], domains: List[str],
                        classes: List[str]) -> List[Dict]:
    """Where a model answers one class for nearly all of a validation domain's images, judged as
    ``evaluate``'s lodo judges a split (``collapsed_class``): each such domain, the largest share first;
    where no domain collapses alone, the domains pooled (domain "avg"), as lodo pools them. Each
    {"domain", "class", "share", "images"}; [] for none. The top-1 there is that class's share of
    those images, which reads like a result (a trial's SWAD average)."""
    found = [(dom, collapsed_class(pred, truth, classes), len(pred)) for (pred, truth), dom in zip(answers, domains)]
    if len(answers) > 1 and not any(c for _, c, _ in found):
        pred, truth = (np.concatenate(x) for x in zip(*answers))
        found = [("avg", collapsed_class(pred, truth, classes), len(pred))]
    said = [{"domain": dom, "class": c[0], "share": c[1], "images": n} for dom, c, n in found if c is not None]
    return sorted(said, key=lambda c: -c["share"])


def collapse_warning(run: str, collapses: List[Dict], selected: Dict) -> str:
    first = collapses[0]
    where = "its validation domains pooled" if first["domain"] == "avg" else f"validation domain {first['domain']}"
    others = [c["domain"] for c in collapses[1:]]
    also = f" (collapsed on {', '.join(others)} too)" if others else ""
    kept = selected["rule"] + (f", step {selected['step']}" if "step" in selected and selected["rule"] == "best_val" else "")
    return (f"warning: run {run}: the kept weights ({kept}) predict {first['class']!r} for {first['share']:.0%} of the "
            f"{first['images']} images of {where}{also}: a collapsed model, whose top-1 there is that class's share "
            "of those images, not a result")


def prediction_ce(outputs: Dict[str, torch.Tensor], text: torch.Tensor, y: torch.Tensor, predict_with: str) -> torch.Tensor:
    """Mean cross-entropy of the logits a student predicts with: its classifier's, or CLIP's 100 x
    cosine to the training classes' text embeddings (the teacher's zero-shot classifier head)."""
    with torch.autocast(text.device.type, enabled=False):
        if predict_with == "linear":
            logits = outputs["logits"].float()
        else:
            logits = 100.0 * F.normalize(outputs["emb"].float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
        return F.cross_entropy(logits, y)


class Selection:
    """Which weights a run keeps: "last", or "best_val" (the evaluation point with the best
    in-domain validation top-1; the earliest on ties, or the latest), kept in memory and in the checkpoint."""

    def __init__(self, rule: str, kept: Callable[[], Dict[str, torch.Tensor]], latest_on_ties: bool = False):
        """``kept``: the weights the run saves (``Trainer.kept_state``)."""
        self.rule, self.kept, self.best, self.step, self.state = rule, kept, None, None, None
        self.latest_on_ties = latest_on_ties

    def update(self, step: int, val: Optional[float]) -> None:
        if self.rule == "best_val" and val is not None and (self.best is None or val > self.best or
                                                             (self.latest_on_ties and val == self.best)):
            self.best, self.step = val, step
            self.state = {k: v.detach().cpu().clone() for k, v in self.kept().items()}

    def state_dict(self) -> Dict:
        return {"best": self.best, "step": self.step, "state": self.state}

    def load_state_dict(self, d: Dict) -> None:
        self.best, self.step, self.state = d["best"], d["step"], d["state"]


def settled_time(device: torch.device) -> float:
    """time.time() once the device has finished the work queued on it (a GPU runs behind the host), so
    that a pause timed from here starts where the training steps end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def _reseed(seed: int, device: torch.device) -> None:
    """Seed the generators in use. Not torch.manual_seed: without initialised CUDA it queues a lazy
    CUDA seeding call with a formatted stack trace every time (measured: a third of a head-only
    step, and a queue that grows for the whole run)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):  # the run's own GPU (a sweep worker's cuda:k), not the current one
            torch.cuda.manual_seed(seed)


def _backbone_key(model: Student, inputs, shared: Optional["Trainer"]) -> Optional[str]:
    """The features key of a run on cached features (None for runs on images). A trainer that shares
    another's inputs (a head pack) has its own backbone: equal to that trainer's, it takes that
    trainer's key and module (one frozen copy in memory for the pack); else its own hash, which the
    pack refuses."""
    if inputs.kind != "features":
        return None
    if shared is None:
        return inputs.key
    own, theirs = model.backbone.state_dict(), shared.model.backbone.state_dict()
    if own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own):
        model.backbone = shared.model.backbone
        return shared.backbone_key
    return features_key(model)


def autocast_on(cfg: TrainConfig, device_type: str, inputs_kind: str) -> bool:
    """bf16 autocast on a GPU where a backbone runs. Head-only runs on cached features stay float32,
    as the closed-form step and a pack of heads do, so a head trains alike alone and in a pack (under
    autocast a solo head drifted 0.02 from its packed twin, both summaries saying the same)."""
    return cfg.amp and device_type == "cuda" and inputs_kind != "features"


ONE_VALIDATION = "one validation to choose among"  # how a best_val run with no choice says why it keeps the last


def selection_rule(cfg: TrainConfig, recipe: Recipe, has_val: bool) -> Tuple[str, str]:
    """(rule, why) for the weights a run keeps. A setting that needs validation rows, on a split left
    with none (split.val_fraction rounds to no row of a domain), is refused rather than replaced."""
    if not has_val and (cfg.averaging == "swad" or cfg.select == "best_val"):
        what = "averaging=swad" if cfg.averaging == "swad" else "select=best_val"
        raise ConfigError(f"{what} needs validation rows, and split.val_fraction={cfg.split.val_fraction} leaves "
                          "none (too few images per training domain); raise split.val_fraction")
    if cfg.averaging != "none":
        return "last", f"averaging={cfg.averaging} defines the final weights"
    rule = recipe.select if cfg.select == "auto" else cfg.select
    why = f"the {recipe.name} recipe's default" if cfg.select == "auto" else "select setting"
    if rule == "best_val" and not has_val:
        return "last", f"no validation rows (split.val_fraction={cfg.split.val_fraction} leaves none)"
    if rule == "best_val" and selection_points(cfg) < 2:  # one validation to choose from: the last weights, said as
        stage = " in the last stage" if len(recipe.stages) > 1 else ""  # such, not as the best (a fuzz)
        return "last", (f"{ONE_VALIDATION}{stage} (eval_every={cfg.eval_every} of steps={cfg.steps}): the "
                        "last weights")
    return rule, why


def check_fresh_run(cfg: TrainConfig, data) -> None:
    """The checks of a run not yet begun, against its split's rows (a run begun before a check resumes as it
    began): the batch fits the split, the split's settings are read, the milestones fall on steps of their own."""
    check_batch_fits(cfg, data)
    data.require_split_read(cfg.split)
    check_milestones(cfg)


def check_batch_fits(cfg: TrainConfig, data) -> None:
    """A batch drawn from fewer training images than it holds repeats images in every step: in-batch
    negatives of the contrastive losses then include the anchor's own copies, and a huge batch_size
    (a typo) ran out of memory minutes in. Refused before the student is built."""
    pools = data.pools(cfg.batch_per_domain)
    fewest = min(len(p) for p in pools)
    if cfg.batch_size > fewest:
        where = "the smallest training domain has" if cfg.batch_per_domain else "the split has"
        raise ConfigError(f"batch_size={cfg.batch_size} is more than the {fewest} training images {where}, so every "
                          f"batch would repeat images; use batch_size <= {fewest}")


class Trainer:
    """One run, from a validated config. ``run()`` trains (or resumes) and finishes it."""

    def __init__(self, cfg: TrainConfig, teacher=None, log: Callable[[str], None] = print,
                 on_step: Optional[Callable[[int], None]] = None, should_stop: Optional[Callable[[], bool]] = None,
                 shared: Optional["Trainer"] = None):
        """``shared``: another trainer on the same store, split and inputs whose loaded arrays this one
        reuses (packs of heads, ``heads.py``)."""
        self.cfg, self.log, self.on_step, self.should_stop = cfg, log, on_step, should_stop
        self.recipe = recipe_of(cfg)
        self.source = cfg.text_source or self.recipe.text_source
        self.run_dir = RunDir(cfg.out or default_out(cfg))
        self.data = shared.data if shared is not None else StoreData(cfg.store, self.source, cfg.split)
        self._stop_if_asked("its store read")
        check_views_used(cfg.views_used, self.data.views, cfg.store, cfg.skip_plain_view, cfg.plain_targets)
        if not self.run_dir.file("checkpoint.pt").exists():
            check_fresh_run(cfg, self.data)
        self.device = resolve_device(cfg.device)
        n_cls = len(self.data.train_class_ids) if self.recipe.classifier else 0
        self.model = build_seeded(cfg.student, self.data.dim, n_cls, cfg.seed).to(self.device)
        self._stop_if_asked("its student built")
        if shared is None:
            self.data.say_if_upscaled(self.model.input_size)
            if not cfg.features:
                say_if_canvases_exceed_memory(self.data.reader, log)
        self.inputs = shared.inputs if shared is not None else \
            INPUTS.get("features" if cfg.features else "canvas")(self.data, self.model, self.device)
        if self.device.type == "cuda" and self.inputs.kind == "images":
            self.model = self.model.to(memory_format=torch.channels_last)  # the inputs come channels-last too
        if cfg.compile:  # the forward only: module names and state dicts stay as they are
            self.model.backbone.forward = torch.compile(self.model.backbone.forward)
        self.targets = shared.targets if shared is not None else TARGETS.get(cfg.targets)(self.data, self.device, teacher=teacher)
        self._stop_if_asked("its inputs and targets loaded")
        self.backbone_key = _backbone_key(self.model, self.inputs, shared)
        # what the run checkpoints, selects, averages and saves: a run on cached features leaves out
        # the frozen backbone (``backbone_key`` names it)
        self.kept = self.model if self.backbone_key is None else Heads.of(self.model)
        self.opt = build_optimizer(cfg.optim, self.model.parameters())
        self.sched = build_scheduler(cfg.optim, self.opt, cfg.steps)
        self.ends = stage_ends(self.recipe, cfg.steps)
        # earlier stages prepare the last (VL2V-ADiP's Align fits the head on the untouched backbone):
        # only the last stage's weights are selected or averaged
        self.last_stage_start = self.ends[-2] if len(self.ends) > 1 else 0
        self.averaging = AVERAGING.get(cfg.averaging)(self.kept, max(int(cfg.average_start * cfg.steps),
                                                                     self.last_stage_start), cfg.swad)
        self.rule, self.rule_why = selection_rule(cfg, self.recipe, len(self.data.val_idx) > 0)
        if cfg.select == "best_val" and self.rule == "last" and cfg.averaging == "none":
            log(f"warning: select=best_val: {self.rule_why}; lower eval_every to choose among more")
        self._check_batch_for_batchnorm()
        self.selection = Selection(self.rule, self.kept_state)
        self.carry = self._carry_selection()
        self._say_unchosen_carry()
        self._say_unformable_valley()
        self.carried: List[Dict] = []  # what each later stage started from (``start_stage``)
        self.text = torch.from_numpy(self.data.text).to(self.device)
        self.amp = autocast_on(cfg, self.device.type, self.inputs.kind)
        self.metrics: List[Dict] = []
        self.running: Dict[str, torch.Tensor] = {}
        self.n_running = 0
        self.val: Optional[float] = None
        self.val_collapse: List[Dict] = []  # of the latest validation (``validation_collapse``)
        self.train_classes = [self.data.classes[i] for i in self.data.train_class_ids]
        self.start = 0
        self.threads_before: List[int] = []  # torch thread counts of the run's earlier attempts (its checkpoint's)
        self.earlier = {"seconds": 0.0, "loop_seconds": 0.0}  # time the earlier attempts trained, to their checkpoint
        self.pack_size = 1  # heads trained together as one vectorised model (heads.py), this run's among them
        self.t_attempt = time.time()
        self._closed: Dict[int, Optional[HeadStep]] = {}

    def _stop_if_asked(self, done: str) -> None:
        """A stop asked while the run sets up (seconds under load, where a sweep's worker waits on it) ends it at
        the next of its parts, not at its first step."""
        if self.should_stop is not None and self.should_stop():
            kept = self.run_dir.file("checkpoint.pt").exists()
            raise RunInterrupted(f"run {self.run_dir.path} stopped as it set up ({done}); "
                                 + ("its checkpoint is kept" if kept else "nothing was trained"))

    # --- state ------------------------------------------------------------------------------------
    def kept_state(self) -> Dict[str, torch.Tensor]:
        """The weights this run checkpoints, selects, averages and saves (``self.kept``)."""
        return self.kept.state_dict()

    def resume(self) -> int:
        state = self.run_dir.load_checkpoint(self.device)
        if state is None:
            return 0
        if state["store_key"] != self.data.key:
            raise StoreMismatchError(f"run {self.run_dir.path} was trained on another store (key {state['store_key']}, "
                                     f"this one {self.data.key}); use another --out")
        saved_key = state.get("backbone_key")
        if saved_key is not None and saved_key != self.backbone_key:
            now = f"give {self.backbone_key}" if self.backbone_key else "train on images (features=false)"
            raise TrainingError(f"run {self.run_dir.path} was trained on the features of backbone {saved_key}; the "
                                f"student settings now {now} (student.pretrained changed?): restore them, or use "
                                "another --out")
        load_weights(self.model, state["model"], backbone_saved=saved_key is None)
        if saved_key is None and self.backbone_key is not None:  # a checkpoint that saved its backbone
            if features_key(self.model) != self.backbone_key:
                raise TrainingError(f"run {self.run_dir.path}: its checkpoint's backbone is not the one whose cached "
                                    f"features this run reads ({self.backbone_key}); use another --out")
            state = without_backbone(state)  # its averages and selected weights hold the backbone too
        load_optimizer_state(self.opt, state["optim"])
        self.sched.load_state_dict(state["sched"])
        self.averaging.load_state_dict(state["averaging"])
        self.selection.load_state_dict(state["selection"])
        if "carry" in state:  # (checkpoints since 2026-12-07)
            self.carry.load_state_dict(state["carry"])
            self.carried = list(state["carried"])
        self.running = {k: v.to(self.device) for k, v in state["running"].items()}
        self.n_running, self.val = state["n_running"], state["val"]
        self.metrics = self.run_dir.read_metrics(up_to=int(state["step"]))  # drop rows logged after the checkpoint
        self.threads_before = [int(n) for n in state.get("torch_threads", [])]  # (checkpoints since 2026-12-06)
        self.earlier = {k: float(state.get(k, 0.0)) for k in self.earlier}  # (checkpoints since 2026-12-06)
        return int(state["step"])

    def threads_used(self) -> List[int]:
        """The torch thread counts of the run's attempts so far, this one's last (each once)."""
        now = torch.get_num_threads()
        return [n for n in self.threads_before if n != now] + [now]

    def say_other_threads(self) -> None:
        """A run resumed with another CPU thread count: its float reductions now split otherwise, so its
        weights differ from an uninterrupted run's by rounding; said, with what keeps them bit for bit
        (the resume said nothing, and the summary named this attempt's count alone: a trial)."""
        before, now = self.threads_before, torch.get_num_threads()
        if self.device.type == "cpu" and before and before[-1] != now:
            self.log(f"resuming with {now} torch threads; the run trained with {before[-1]} so far: its weights will "
                     f"differ from an uninterrupted run's by float rounding; OMP_NUM_THREADS={before[-1]} keeps them "
                     "bit for bit")

    def checkpoint(self, step: int, loop_seconds: float) -> None:
        """The resume state at ``step``, with the time trained so far over every attempt (``loop_seconds``:
        this attempt's steps so far): a resumed run's summary counts them all."""
        self.run_dir.save_checkpoint({
            "seconds": self.earlier["seconds"] + time.time() - self.t_attempt,
            "loop_seconds": self.earlier["loop_seconds"] + loop_seconds,
            "model": self.kept_state(), "backbone_key": self.backbone_key,
            "optim": self.opt.state_dict(), "sched": self.sched.state_dict(),
            "averaging": self.averaging.state_dict(), "selection": self.selection.state_dict(),
            "carry": self.carry.state_dict(), "carried": self.carried,
            "running": self.running, "n_running": self.n_running, "val": self.val,
            "step": step, "store_key": self.data.key, "torch_threads": self.threads_used()})

    def write_run_files(self) -> None:
        d = self.data
        self.run_dir.write_config(self.cfg, d.reader.store, definition(self.recipe, self.cfg.averaging, self.cfg.select))
        self.run_dir.write_split({  # what the run trained on, for evaluation without this package
            "train_idx": d.train_idx.tolist(), "val_idx": d.val_idx.tolist(), "test_idx": d.test_idx.tolist(),
            "holdout_domains": list(self.cfg.split.holdout_domains), "seen_classes": d.train_class_ids.tolist(),
            "text_source": self.source, "predict": self.recipe.predict, "dim": d.dim,
            # a run on cached features saves no backbone: this key (a hash of its weights) names it
            "backbone_key": self.backbone_key,
            # what another store must share with this one for the run to be scored on it (--transfer)
            "trained_on": d.reader.scoring_facts(self.source)})

    def _check_batch_for_batchnorm(self) -> None:
        """BatchNorm in training mode needs two images a batch (torch fails the step with a traceback)."""
        trains_backbone = self.inputs.kind != "features" and any(st.train != "head" for st in self.recipe.stages)
        has_bn = bool(batchnorms(self.model.backbone))
        if trains_backbone and has_bn and not self.cfg.freeze_bn and self.batch_rows < 2:
            raise ConfigError(f"batch_size={self.cfg.batch_size} gives {self.batch_rows} image a step, and the "
                              f"{self.cfg.student.name} student's BatchNorm needs at least 2 in training; use batch_size >= 2")

    # --- the loop -----------------------------------------------------------------------------------
    @property
    def batch_rows(self) -> int:
        """Images per step: batch_size, times the training domains with batch_per_domain."""
        return self.cfg.batch_size * len(self.data.pools(self.cfg.batch_per_domain))

    def draw(self, step: int) -> Tuple[np.ndarray, np.ndarray]:
        """The rows and views of step ``step`` (past the last step: the BatchNorm refresh's batches)."""
        cfg = self.cfg
        return self.data.sample(step, cfg.seed, cfg.batch_size, cfg.views_used, cfg.batch_per_domain,
                                cfg.skip_plain_view)

    def target_views(self, views: np.ndarray) -> np.ndarray:
        """The views whose teacher embeddings are the targets of the drawn ``views`` (``data.target_views``)."""
        return target_views(views, self.cfg.plain_targets)

    def step(self, step: int, stage: Stage) -> None:
        cfg = self.cfg
        idx, views = self.draw(step)
        _reseed(cfg.seed * 1_000_003 + step, self.device)  # dropout / drop-path draws, reproducible on resume
        t, y = self.targets(idx, self.target_views(views))
        closed = self.closed_form(stage)
        if closed is not None:  # head-only on cached features: gradients in closed form, float32 even with amp
            loss, parts = closed(self.inputs(idx, views), t, y)
        else:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                o = forward(self.model, self.inputs, idx, views, frozen_backbone=stage.train == "head")
                loss, parts = stage_loss(stage, BatchContext(o["emb"], t, self.text, y, o["logits"]))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        optimizer_step(self.opt)
        self.last_lr = self.opt.param_groups[0]["lr"]  # the rate this step used (metrics), before the schedule moves
        self.sched.step()
        add_running(self.running, {"loss": loss, **parts})
        self.n_running += 1
        self.averaging.after_step(step + 1, self.kept)

    def closed_form(self, stage: Stage) -> Optional[HeadStep]:
        """The stage's closed-form head step (``headstep.py``) where it has one, else None (autograd).
        Cached by ``id(stage)``: stages live as long as their recipe."""
        key = id(stage)
        if key not in self._closed:
            ok = HeadStep.applies(self.model, stage, self.inputs.kind)
            self._closed[key] = HeadStep(self.model.head, self.model.classifier, stage, self.text) if ok else None
        return self._closed[key]

    def diverged(self, what: str, step: int) -> TrainingError:
        last = max((r["step"] for r in self.metrics), default=None)
        before = f"last finite evaluation: step {last}" if last is not None else "no evaluation before it"
        what_to = "lower optim.lr" + (" or check the loss_weights/loss_args given" if self.cfg.loss_weights or
                                      self.cfg.loss_args else "")
        if self.run_dir.file("sweep.json").exists():  # a sweep's run: its settings come from the sweep file
            fix = f"{what_to} in the sweep file (another value is another run)"
        else:
            fix = (f"{what_to}, with another --out or after deleting {self.run_dir.path} (a run's folder keeps its "
                   "settings)")
        err = TrainingError(f"run {self.run_dir.path}: {what} by step {step} ({before}); {fix}, or check the store with "
                            "`embedcache verify`; the run is not marked done")
        self.run_dir.record_failure(f"TrainingError: {err}")  # evaluate says it failed, not "not finished"
        return err

    def check_finite(self, step: int) -> None:
        loss = self.running.get("loss")
        if loss is not None and not bool(torch.isfinite(loss)):
            raise self.diverged(f"the loss became {float(loss)}", step)

    def validate(self, step: int, stage: Optional[Stage] = None) -> Tuple[float, Optional[float], Optional[float]]:
        """Validation top-1, recipe loss (without ``stage``: None) and prediction cross-entropy of the
        model as it is, each the mean over the validation domains of that domain's figure, as DomainBed
        selects and SWAD's evaluator measures (pooled, PACS's 786 sketch rows would outvote its 410 art
        ones); a TrainingError when its outputs or its losses are not finite."""
        per_domain, answers = [], []
        for rows in self.data.val_by_domain:
            try:
                pred, loss, ce = validate(self.model, self.inputs, self.targets, self.data, rows,
                                          self.recipe.predict, self.text, stage)
            except NonFiniteOutputs:
                raise self.diverged("the student's outputs on validation images became NaN or inf", step) from None
            truth = self.data.targets[rows]
            per_domain.append((top1(pred, truth), loss, ce))
            answers.append((pred, truth))
        self.val_collapse = validation_collapse(answers, self.data.val_domains, self.train_classes)
        val, val_loss, val_ce = (None if v[0] is None else float(np.mean(v)) for v in zip(*per_domain))
        for what, v in (("loss", val_loss), ("cross-entropy", val_ce)):
            if v is not None and not np.isfinite(v):
                raise self.diverged(f"the validation {what} became {v}", step)
        return val, val_loss, val_ce

    def evaluate(self, step: int, stage_i: int, stage: Stage) -> None:
        val = val_loss = val_ce = None
        if len(self.data.val_idx):
            val, val_loss, val_ce = self.validate(step, stage)
        self.averaging.at_eval(step, self.kept, val_ce)  # SWAD's valley: the evaluator's cross-entropy
        if step > self.last_stage_start:
            self.selection.update(step, val)
        else:
            self.carry.update(step, val)
        lr = getattr(self, "last_lr", self.opt.param_groups[0]["lr"])  # of the last step taken
        row = {"step": step, "stage": stage_i, "lr": lr, "val_top1": val, "val_loss": val_loss, "val_ce": val_ce,
               **({"val_collapsed": self.val_collapse} if val is not None and self.val_collapse else {}),
               **{k: float(v) / max(1, self.n_running) for k, v in self.running.items()}}
        self.metrics.append(row)
        self.run_dir.write_metrics(self.metrics)
        self.running, self.n_running, self.val = {}, 0, val

    def _carry_selection(self) -> Selection:
        """The weights of the stage running that the next one starts from (``Recipe.carry``)."""
        best = self.recipe.carry == "best_val" and len(self.data.val_idx) > 0
        # the latest on ties: VL2V-ADiP's Align saves its checkpoint at each evaluation that equals its best
        return Selection("best_val" if best else "last", self.kept_state, latest_on_ties=True)

    def _say_unchosen_carry(self) -> None:
        """A recipe whose later stage starts from the stage before's best validation, where that stage holds
        fewer than two validations to choose among: it starts from the last weights, which was said only in
        the summary (a review)."""
        if self.carry.rule != "best_val":
            return
        for si, (start, end) in enumerate(zip([0] + self.ends[:-2], self.ends[:-1])):
            at = validation_steps(self.cfg, start, end)
            if len(at) >= 2:
                continue
            what = ("the last weights" if not at else f"its weights of step {at[0]}, the one validated" +
                    ("" if at[0] == end else f", not its last (step {end})"))
            self.log(f"warning: stage {si + 2} starts from stage {si + 1}'s weights of its best validation top-1, and "
                     f"eval_every={self.cfg.eval_every} validates stage {si + 1} (steps {start + 1}-{end}) {len(at)} "
                     f"time(s): it starts from {what}; lower eval_every to choose among more")

    def _say_unformable_valley(self) -> None:
        """SWAD over fewer evaluations than start its valley (swad.n_converge) keeps the last segment's average and
        said only afterwards that its loss "never settled", though it could not (a trial): said as the run starts."""
        cfg = self.cfg
        if cfg.averaging != "swad":
            return
        start = self.averaging.start
        points = len(validation_steps(cfg, start, cfg.steps))
        if points < cfg.swad.n_converge:
            self.log(f"warning: averaging=swad over steps {start + 1}-{cfg.steps} evaluates {points} time(s), fewer than "
                     f"the swad.n_converge={cfg.swad.n_converge} that start its valley: it will keep the last segment's "
                     "average; lower eval_every")

    def start_stage(self, si: int) -> None:
        """Stage ``si`` starts from the weights its recipe carries from the stage before: the last ones, or
        those of its best validation top-1 (VL2V-ADiP's Distill loads Align's best checkpoint); recorded
        in ``self.carried`` for the summary."""
        carry, step = self.carry, self.ends[si - 1]
        if carry.state is not None:
            load_weights(self.model, carry.state, backbone_saved=self.backbone_key is None)
            said = {"stage": si + 1, "from_step": carry.step, "val_top1": carry.best, "why": "the best validation top-1"}
            self.log(f"stage {si + 1} starts from stage {si}'s weights of step {carry.step} (its best validation "
                     f"top-1, {100 * carry.best:.1f}%)")
        else:
            why = ("the recipe's rule" if self.recipe.carry == "last" else
                   "no validation rows" if not len(self.data.val_idx) else "no validation in the stage before")
            said = {"stage": si + 1, "from_step": step, "why": f"the last weights ({why})"}
        self.carried.append(said)
        self.carry = self._carry_selection()

    def say_stage(self, step: int, si: int, bar) -> None:
        """A recipe of several stages says each as it starts, and its bar shows the one running (VL2V-ADiP's
        align then distill were seen only in metrics.jsonl, a trial)."""
        stages = self.recipe.stages
        if len(stages) < 2:
            return
        st = stages[si]
        line = (f"step {step}: stage {si + 1} of {len(stages)} ({' + '.join(st.losses)}; trains "
                f"{'everything' if st.train == 'all' else 'the ' + st.train})")
        (bar.write if not bar.disable else self.log)(line)
        bar.set_postfix(stage=f"{si + 1}/{len(stages)}")

    def loop(self) -> float:
        """Train from ``self.start`` to the last step; the seconds spent training (evaluations and
        checkpoints left out)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.should_stop is not None and self.should_stop():  # asked while the run set up: nothing new to save
            raise RunInterrupted(f"run {self.run_dir.path} stopped before step {self.start + 1}" +
                                 (f" (its checkpoint at step {self.start} kept)" if self.start else ""))
        bar = tqdm(total=cfg.steps, initial=self.start, desc=self.run_dir.name, unit="step", disable=not cfg.progress,
                   dynamic_ncols=True)
        stage_i = None
        t0, paused = time.time(), 0.0
        try:
            for step in range(self.start, cfg.steps):
                si = next(i for i, e in enumerate(self.ends) if step < e)
                stage = self.recipe.stages[si]
                if si != stage_i:
                    if si > 0 and step == self.ends[si - 1]:  # a stage begins (not a resume inside it)
                        self.start_stage(si)
                    set_trainable(self.model, stage, cfg.freeze_bn)
                    stage_i = si
                    self.say_stage(step, si, bar)
                self.step(step, stage)
                done = step + 1
                paused += self.at_point(done, si, stage, bar, t0 + paused)
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(done)
                if self.should_stop is not None and self.should_stop() and done < cfg.steps:
                    self.check_finite(done)
                    self.checkpoint(done, time.time() - t0 - paused)
                    raise RunInterrupted(f"run {self.run_dir.path} stopped at step {done} (checkpoint saved)")
        finally:
            bar.close()
        return time.time() - t0 - paused

    def at_point(self, done: int, si: int, stage, bar, since: float) -> float:
        """Evaluate and checkpoint where ``done`` steps are due for them; the seconds that took, which the
        training time leaves out. ``since``: the loop's start, moved on by its pauses so far."""
        cfg = self.cfg
        at_eval = done % cfg.eval_every == 0 or done == cfg.steps
        at_ckpt = done % cfg.ckpt_every == 0 or done == cfg.steps
        if not (at_eval or at_ckpt):
            return 0.0
        t_pause = settled_time(self.device)
        self.check_finite(done)
        if at_eval:
            self.evaluate(done, si, stage)
            stages = len(self.recipe.stages)
            bar.set_postfix(loss=f"{self.metrics[-1]['loss']:.3f}", val="-" if self.val is None else f"{self.val:.3f}",
                            **({"stage": f"{si + 1}/{stages}"} if stages > 1 else {}))
        if at_ckpt:
            self.checkpoint(done, t_pause - since)
        return time.time() - t_pause

    # --- the end ------------------------------------------------------------------------------------
    def final_weights(self) -> Tuple[Dict[str, torch.Tensor], Dict]:
        averaged = self.averaging.final(self.log)
        if averaged is not None:
            own, said = self.kept_state(), self.averaging.describe() or {}
            state = {k: v.to(own[k].dtype) for k, v in averaged.items()}
            why = self.rule_why if said.get("swad_settled", True) else \
                "averaging=swad: the validation loss never settled, so the last segment's average, as SWAD's code keeps"
            return state, {"rule": f"average ({self.cfg.averaging})", "why": why, "start_step": self.averaging.start,
                           **said}
        if self.rule == "best_val" and self.selection.state is not None:
            return self.selection.state, {"rule": "best_val", "step": self.selection.step,
                                          "val_top1": self.selection.best, "why": self.rule_why}
        why = self.rule_why
        if self.cfg.averaging == "swad":  # no segment to keep: nothing was averaged
            why = "averaging=swad: the validation loss never settled, so the last weights"
        return self.kept_state(), {"rule": "last", "step": self.cfg.steps, "why": why}

    def kept_collapse(self, selected: Dict) -> List[Dict]:
        """The kept weights' collapses on the validation images (``validation_collapse``), [] for none:
        averaged weights as ``finish`` has just validated them, others as their evaluation point's
        row of metrics.jsonl recorded it (a resumed run's rows are its earlier attempts' too)."""
        if selected["rule"].startswith("average"):
            return self.val_collapse if len(self.data.val_idx) else []
        row = next((r for r in self.metrics if r["step"] == selected.get("step")), {})
        return row.get("val_collapsed", [])

    def refresh_bn(self) -> Optional[str]:
        """Averaged weights with the averaged BatchNorm statistics are not a network that ever ran: the
        statistics are recomputed for them (cumulative mean over ``average_bn_batches`` training
        batches, drawn as steps after the last, in the last stage's modes). Not when the last stage
        kept the backbone or its BatchNorm frozen (its statistics never moved: SWAD's code refreshes them
        only where its BatchNorm trains) or the run has no BatchNorm."""
        last, n = self.recipe.stages[-1], self.cfg.average_bn_batches
        bns = [m for m in batchnorms(self.model) if m.track_running_stats]
        if n == 0 or not bns or last.train == "head" or self.inputs.kind == "features" or self.cfg.freeze_bn:
            return None
        set_trainable(self.model, last)
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative mean over the batches
        cfg = self.cfg
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            for i in range(cfg.steps, cfg.steps + n):
                interrupt.check("recomputing BatchNorm statistics")  # the checkpoint stands; a rerun redoes this
                idx, views = self.draw(i)
                _reseed(cfg.seed * 1_000_003 + i, self.device)
                self.model(self.inputs(idx, views))
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        return f"recomputed over {n} training batches"

    def finish(self, t_start: float, loop_seconds: float) -> RunResult:
        state, selected = self.final_weights()
        val = self.val
        if selected["rule"].startswith("average"):
            load_weights(self.model, state, backbone_saved=self.backbone_key is None)
            bn = self.refresh_bn()
            if bn is not None:
                state, selected = self.kept_state(), {**selected, "batchnorm": bn}
        if selected["rule"] == "best_val" and self.selection.best is not None:
            val = self.selection.best  # measured on these very weights when they were selected
        elif selected["rule"] != "last" and len(self.data.val_idx):  # averaged weights: not measured yet
            val = self.validate(self.cfg.steps)[0]
        if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
            raise self.diverged(f"its final weights ({selected['rule']}) hold NaN or inf", self.cfg.steps)
        collapse = self.kept_collapse(selected)
        if collapse:
            self.log(collapse_warning(self.run_dir.name, collapse, selected))
        self.run_dir.save_weights(state)
        threads = self.threads_used()
        summary = {"val_top1": val, "val_images": int(len(self.data.val_idx)), "steps": self.cfg.steps,
                   "batch_rows": self.batch_rows, "selected": selected,
                   **({"stages_started": self.carried} if self.carried else {}),
                   **({"val_collapsed": collapse} if collapse else {}),
                   # over every attempt, each stopped one up to its last checkpoint
                   "loop_seconds": self.earlier["loop_seconds"] + loop_seconds, "heads_packed": self.pack_size,
                   "seconds": self.earlier["seconds"] + time.time() - t_start, "store_key": self.data.key, "recipe": self.recipe.name,
                   "student": self.cfg.student.name,
                   # float reductions split over another thread count round differently: runs compare bit
                   # for bit only at equal thread counts (and torch versions)
                   "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(self.device),
                   "versions": library_versions(),  # timm builds the students, faiss scores them; the code's commit
                   **({"torch_threads_earlier": threads[:-1]} if len(threads) > 1 else {}),
                   # how each stage took its gradients: the two agree to float32 rounding, not bit for bit
                   "gradients": ["closed form, float32" if HeadStep.applies(self.model, st, self.inputs.kind)
                                 else "autograd, bf16 autocast" if self.amp else "autograd" for st in self.recipe.stages],
                   "train_classes": self.train_classes}
        self.run_dir.finish(summary, keep_checkpoint=self.cfg.keep_checkpoint)
        return RunResult(str(self.run_dir.path), val, self.cfg.steps, time.time() - t_start, self.start, loop_seconds,
                         selected, val_images=summary["val_images"])

    def run(self) -> RunResult:
        t0 = self.t_attempt = time.time()
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        self.start = self.resume()
        if self.start:
            self.log(f"resuming {self.run_dir.path} from step {self.start}")
            self.say_other_threads()
        else:  # a fresh start (a resume said it when the run began)
            for note in (stage_schedule_note(self.cfg), frozen_random_note(self.cfg)):
                if note:
                    self.log(note)
        self.write_run_files()
        loop_seconds = self.loop()
        return self.finish(t0, loop_seconds)


def train(cfg: TrainConfig, on_step: Optional[Callable[[int], None]] = None, log: Callable[[str], None] = print,
          teacher=None, should_stop: Optional[Callable[[], bool]] = None, unread_ok: bool = False) -> RunResult:
    """Train (or resume, or skip) one run. ``teacher`` is only for ``targets=teacher_online``;
    ``should_stop`` is polled after every step (a stop saves a checkpoint, then raises RunInterrupted).
    ``unread_ok``: a setting the run does not read is let by (a sweep's, whose base serves every run); else
    a fresh run refuses one (a run begun before the check resumes with its own settings)."""
    cfg = build_config(TrainConfig, to_dict(cfg))  # validated even when built in code, before any work
    if not cfg.store:
        raise ConfigError("no store given; pass --store PATH (made by `embedcache extract`)")
    if not cfg.out:
        cfg = replace(cfg, out=default_out(cfg))
    run_dir = RunDir(cfg.out)
    require_folder_for(run_dir.path, "run")
    require_same_settings(run_dir, cfg)
    if run_dir.done:
        s = run_dir.summary
        val = s["val_top1"]
        log(f"{run_dir.path} is already done" + (f" (val top-1 {100 * val:.1f}%)" if val is not None else ""))
        return RunResult(str(run_dir.path), s["val_top1"], s["steps"], 0.0, selected=s.get("selected"), already_done=True,
                         val_images=s.get("val_images"))
    if not unread_ok and not run_dir.file("config.json").exists():
        refuse_unread_training(cfg)
    check_trainable(cfg)
    with one_trainer(run_dir):
        if run_dir.done:  # finished by the process that held the folder a moment ago
            return train(cfg, on_step, log, teacher, should_stop, unread_ok)
        try:
            return Trainer(cfg, teacher, log, on_step, should_stop).run()
        except DiskFullError:
            raise  # said already, naming the file and what filled (the file-size limit was said as a full disk)
        except (OSError, RuntimeError) as exc:
            if is_disk_full(exc):
                raise disk_full_error(run_dir.path, cause=exc) from exc
            raise


BEFORE_TRAINING = ("config.json", "split.json")  # what a run writes before its first step


@contextmanager
def one_trainer(run_dir: RunDir):
    """The run folder held by this process while it trains: a second `train` of it (a script run twice)
    trained the whole run beside the first, taking over its checkpoints. The lock goes once the run is done."""
    made = [p for p in (run_dir.path, *run_dir.path.parents) if not p.exists()]  # the folder and those above it
    run_dir.path.mkdir(parents=True, exist_ok=True)
    lock = run_dir.file(".train.lock")
    fd = try_exclusive_lock(lock)
    if fd is None:
        raise RunBusyError(f"another `embedcache train` is running in {run_dir.path}; wait for it to finish (rerunning "
                            "then finds the run done), or give another --out")
    try:
        yield
    finally:
        unstarted = made and {p.name for p in run_dir.path.iterdir()} <= {lock.name, *BEFORE_TRAINING}
        if unstarted:  # a folder made for a run that stopped before training (a damaged store): nothing to resume
            for name in BEFORE_TRAINING:
                run_dir.file(name).unlink(missing_ok=True)
        if run_dir.done or unstarted:
            lock.unlink(missing_ok=True)  # a finished run keeps its results only; a folder made for nothing goes
        os.close(fd)
        for folder in made:  # innermost first, while empty
            if any(folder.iterdir()):
                break
            folder.rmdir()
