"""The evaluate and sweep sections: label strategies, the evaluation protocols (``PROTOCOLS``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


from hello_ray.label_spec import BASES, StrategySpecError, parse_spec
from hello_ray.config.sections import (
    parse_window,
    _check,
    _check_seed,
    _help,
)

LABEL_STRATEGIES = BASES
TEMPERATURE_SCHEDULES = ("constant", "lpqld")
SCORE_SCALES = ("percent", "fraction")


def _check_strategy(spec: str, key: str) -> None:
    """A label strategy spec (``label_spec.py``): base[/N][@topK | @dtype][+phases][+noaug]."""
    try:
        parse_spec(spec)
    except StrategySpecError as e:
        _check(False, key, str(e))


def parse_phases(text: str, key: str = "evaluate.phases") -> list[tuple[str, int]]:
    """'soft:75,hard:150,soft:75' -> [('soft', 75), ('hard', 150), ('soft', 75)]; '' -> []."""
    if not text.strip():
        return []
    out = []
    for part in text.split(","):
        kind, _, n = part.strip().partition(":")
        _check(kind in ("soft", "hard") and n.strip().isdigit() and int(n) >= 1, key,
               f"{part.strip()!r}: each phase is soft:N or hard:N with N >= 1 epochs")
        out.append((kind, int(n)))
    return out


def lpqld_temperature(epoch: int, t0: float = 20.0, gamma: float = 0.7, every: int = 30, floor: float = 2.0) -> float:
    """LPQLD's Dynamic Knowledge Reuse: the labels' temperature in (0-based) ``epoch``.

    he-y/soft-label-pruning-quantization-for-dataset-distillation at 107c7a5,
    ``relabel_and_validate/train_FKD_LPQLD.py`` l. 515-518 and l. 597 (epochs counted from 1 there),
    settings of ``scripts/reproduce/lpqld_in1k.sh`` l. 86-89: T = t0 x gamma^floor(e / every) with e
    the 1-based epoch, used while above ``floor``, else ``floor``. So epochs 1-29 (1-based) run at 20,
    30-59 at 14, ..., 210 on at 2.
    """
    t = t0 * gamma ** ((epoch + 1) // every)
    return t if t > floor else floor


# What each evaluation protocol sets (keys the user gives still win). Sources: hello = METHOD.md
# stage 5; rded = LINs-lab/RDED @ 3f6453d validation/main.py (KL batchmean of softmax(T=20) with
# CutMix, no CE, no T^2; LambdaLR 0.5(1+cos(pi e/E/2)) stepped per epoch; AdamW without decay on
# biases/norms; best top-1 over epochs > 0.8E at e % 10 == 9 and the last); fkd = VILA-Lab/SRe2L @
# 8d00cba validate/train_FKD.py and he-y/soft-label-pruning-for-dataset-distillation @ 63eee18
# (KL at T=20, no T^2; 0.5(1+cos(pi e/E)) per epoch; best of every 10th epoch and the last).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "hello": {"loss": "mse_ce", "ce_weight": 0.025, "temperature": 4.0, "schedule": "cosine_step",
              "decay": "all", "report": "final"},
    "rded": {"loss": "kl_plain", "ce_weight": 0.0, "temperature": 20.0, "schedule": "half_cosine_epoch",
             "decay": "weights", "report": "rded_best"},
    "fkd": {"loss": "kl_plain", "ce_weight": 0.0, "temperature": 20.0, "schedule": "cosine_epoch",
            "decay": "weights", "report": "fkd_best"},
    # he-y/soft-label-pruning-quantization-for-dataset-distillation @ 107c7a5 train_FKD_LPQLD.py: FKD's
    # recipe (KL batchmean, no T^2, per-epoch cosine, AdamW 0.01 on weights) with the labels' temperature
    # decaying 20 x 0.7 every 30 epochs (floor 2) and the student's at 1 (its scripts' --temp_stu_dynamic
    # 1.0 start; the per-epoch recalibration of the student's temperature, "CA", is not reproduced).
    "lpqld": {"loss": "kl_plain", "ce_weight": 0.0, "temperature": 20.0, "temperature_schedule": "lpqld",
              "student_temperature": 1.0, "schedule": "cosine_epoch", "decay": "weights", "report": "fkd_best"},
    # Jiacheng8/HALD @ ffbca04 validate/train_fkd.py: soft phases as FKD (KL at T=20 both sides, no T^2),
    # hard phases with CutMix and label smoothing 0.8 under soft cross-entropy; one AdamW, its rate
    # 0.5 (1 + cos(pi e / (2E))) per epoch (eta 2 of validate/hyper.yaml: RDED's half cosine), decay on
    # weights only; best of every 10th epoch and the last. Phases 75/150/75 of 300 (its imagenet1k
    # train.sh), scaled to evaluate.epochs.
    "hald": {"loss": "kl_plain", "ce_weight": 0.0, "temperature": 20.0, "schedule": "half_cosine_epoch",
             "decay": "weights", "report": "fkd_best", "phases": "soft:75,hard:150,soft:75",
             "label_smoothing": 0.8},
}


@dataclass
class EvalConfig:
    students: list[str] = _help("student architectures", default_factory=lambda: ["resnet18"])
    strategies: list[str] = _help("label strategies: hard | teacher | stored | stored/N (LPLD prune "
                                  "1/N) | projector, with @topK (stored: LPQLD's top-k logits), @fp32|fp16|int8 "
                                  "(projector adapter precision), +phases (train in evaluate.phases), +noaug "
                                  "(no augmentation; online labels)", default_factory=lambda: ["projector"])
    epochs: int = _help("student epochs", default=300)
    batch_size: int = _help("global batch size", default=100)
    protocol: str = _help("evaluation protocol: hello (METHOD.md) | rded (LINs-lab/RDED validation/main.py) | "
                          "fkd (SRe2L/LPLD train_FKD.py) | lpqld (LPQLD train_FKD_LPQLD.py) | hald (HALD "
                          "train_fkd.py); sets loss, temperature, ce_weight, schedule, decay and report "
                          "(and the keys of its own) unless those keys are given", default="hello")
    # RDED's per-architecture AdamW rates (LINs-lab/RDED @ 3f6453d, argument.py l. 276-306); RDED sets
    # none for shufflenet_v2_x0_5 (its default is 0): we use resnet18's 1e-3, a conv net of that scale.
    lr: dict[str, float] = _help("AdamW learning rate per student architecture", default_factory=lambda: {
        "resnet18": 1e-3, "shufflenet_v2_x0_5": 1e-3, "mobilenet_v2": 2.5e-3,
        "efficientnet_b0": 2e-3, "swin_v2_t": 1e-4, "vgg11": 5e-4, "vit_b_16": 1e-4,
        "conv3": 1e-3, "conv4": 1e-3, "conv5": 1e-3, "conv6": 1e-3})
    weight_decay: float = _help("AdamW weight decay", default=0.01)
    cutmix_alpha: float = _help("CutMix Beta(alpha, alpha); 0 disables", default=1.0)
    loss: str = _help("mse_ce (METHOD.md) | kl (T^2 x KL at a temperature) | kl_plain (KL batchmean at a "
                      "temperature, no T^2: RDED's and SRe2L/LPLD's code)", default="mse_ce")
    ce_weight: float = _help("weight of CE(mixed true class) in mse_ce", default=0.025)
    temperature: float = _help("temperature of the kl losses (the labels' at epoch 1)", default=4.0)
    temperature_schedule: str = _help("the labels' temperature over epochs: constant | lpqld (x 0.7 every 30 "
                                      "epochs, floor 2: LPQLD's Dynamic Knowledge Reuse)", default="constant")
    student_temperature: float = _help("the student's temperature in the kl losses; 0 = the labels' "
                                       "temperature of the epoch", default=0.0)
    phases: str = _help("phase schedule of the +phases strategies (HALD), e.g. soft:75,hard:150,soft:75: "
                        "lengths in epochs, scaled to evaluate.epochs; '' = none", default="")
    label_smoothing: float = _help("label smoothing of the hard phases (HALD: 0.8; eps/C on every class, "
                                   "1 - eps more on the true one)", default=0.8)
    full_data: bool = _help("also train each student on the whole real training set with hard labels "
                            "(image set 'full'): LRS's A(full, hard), measured; held in memory, so for "
                            "small sets (else give evaluate.full_top1)", default=False)
    full_top1: float = _help("top-1 (fraction) of the student trained on the whole real training set with "
                             "hard labels: LRS's hard-label recovery needs it (DD-Ranking caches 0.565 for "
                             "ImageNet-1K ResNet-18); 0 = unknown, no LRS", default=0.0)
    score_scale: str = _help("units of the accuracies inside LRS/ARS: percent (DD-Ranking's code) | "
                             "fraction (its docs' [0, 1] reading)", default="percent")
    score_weight: float = _help("DD-Ranking's lrs_lambda / ars_lambda: weight of IOR in LRS and of the "
                                "augmented gap in ARS", default=0.5)
    schedule: str = _help("learning-rate schedule: cosine_step (0.5(1+cos(pi t/T)) per step) | cosine_epoch "
                          "(the same per epoch, FKD) | half_cosine_epoch (0.5(1+cos(pi e/E/2)) per epoch, "
                          "ends near half the rate, RDED)", default="cosine_step")
    decay: str = _help("which parameters weight decay applies to: all | weights (tensors of 2+ dims; "
                       "no decay on biases and norms, RDED/FKD)", default="all")
    report: str = _help("which epoch's top-1 a row reports as best: final | rded_best (best of epochs "
                        "> 0.8E at every 10th and the last) | fkd_best (best of every 10th epoch and the "
                        "last); the final epoch's top-1 is always reported too", default="final")
    seeds: list[int] = _help("student seeds (mean +- std over them)", default_factory=lambda: [0, 1, 2])
    floor: bool = _help("also train on random real images, as many per class (the floor and controls)",
                        default=True)
    floor_strategies: list[str] = _help("label strategies on those random real images: hard is the "
                                        "floor; teacher, stored, projector are the controls that show what "
                                        "selection adds at equal labels", default_factory=lambda: ["hard"])
    continual_steps: list[int] = _help("GDumb class-incremental runs, e.g. [5, 10]; empty = none",
                                       default_factory=list)
    continual_strategies: list[str] = _help("label strategies of the continual runs (online ones: "
                                            "hard | teacher | projector)",
                                            default_factory=lambda: ["projector"])
    prune_pool: str = _help("which label batches stored/N keeps: lpld (the first floor(T/N) in (epoch, "
                            "batch) order, only those relabelled; LPLD) | random (a seeded draw of "
                            "ceil(T/N) anywhere)", default="lpld")
    teacher_labels: str = _help("what the teacher strategy and the stored relabel pass use: observer | "
                                "window (mean logits of transfer.teacher_window)", default="observer")
    label_precision: str = _help("online labellers (teacher, projector, the stored relabel pass): auto "
                                 "(bf16 autocast on GPUs with native bf16, Ampere on; fp32 on CPU and older GPUs) | "
                                 "bf16 (warns where emulated: slower than fp32) | fp32", default="auto")
    parallel: str = _help("how the Train workers share the grid: queue (each worker trains whole rows, "
                          "taken longest first from a queue; no gradient all-reduce) | ddp (one row at a "
                          "time, its batch split over all workers) | auto (queue when the rows fill the "
                          "workers, else ddp)", default="auto")
    gpus_per_row: float = _help("queue mode on GPUs: the share of a GPU one row's worker holds (0.25: four "
                                "rows per GPU; 0 = auto from the step's pixels against an ImageNet step's); "
                                "not in the key", default=0.0)
    stored_labels: str = _help("a labels-* artifact key (hello-ray labels-import: SRe2L/LPLD relabel records) "
                               "whose views and logits the stored strategies replay instead of relabelling the "
                               "distilled images with our teacher (stored/N: evaluate.prune_pool of its batches; "
                               "'' = relabel)", default="")
    stored_views: str = _help("whose views the stored strategies relabel: per_seed (each seed's own view "
                              "sequence, the one its hard, teacher and projector rows train on; the first "
                              "seed's labels are the set that ships) | first_seed (every seed replays the "
                              "first seed's relabel, as a single relabel pass of SRe2L/FKD does)",
                              default="per_seed")
    precision: str = _help("the student's forward and loss: fp32 (the references') | bf16 (autocast)",
                           default="fp32")
    loss_check_every: int = _help("steps between reads of the student's loss on the host (a non-finite "
                                  "one still names its step; not in the key)", default=50)

    def validate(self, p: str = "evaluate") -> None:
        _check(len(self.students) >= 1, f"{p}.students", "name at least one student")
        for field_name in ("strategies", "floor_strategies"):
            for spec in getattr(self, field_name):
                _check_strategy(spec, f"{p}.{field_name}")
        for s in self.students:
            _check(s in self.lr, f"{p}.lr", f"no learning rate for student {s!r}")
        for s, lr in self.lr.items():
            _check(lr > 0, f"{p}.lr.{s}", "must be > 0 (a zero rate trains nothing)")
        _check(self.protocol in PROTOCOLS, f"{p}.protocol", f"must be one of {', '.join(PROTOCOLS)}")
        _check(self.loss in ("mse_ce", "kl", "kl_plain"), f"{p}.loss", "must be 'mse_ce', 'kl' or 'kl_plain'")
        _check(self.schedule in ("cosine_step", "cosine_epoch", "half_cosine_epoch"), f"{p}.schedule",
               "must be 'cosine_step', 'cosine_epoch' or 'half_cosine_epoch'")
        _check(self.decay in ("all", "weights"), f"{p}.decay", "must be 'all' or 'weights'")
        _check(self.report in ("final", "rded_best", "fkd_best"), f"{p}.report",
               "must be 'final', 'rded_best' or 'fkd_best'")
        _check(self.temperature > 0, f"{p}.temperature", "must be > 0")
        _check(self.temperature_schedule in TEMPERATURE_SCHEDULES, f"{p}.temperature_schedule",
               f"must be one of {', '.join(TEMPERATURE_SCHEDULES)}")
        _check(self.student_temperature >= 0, f"{p}.student_temperature", "must be >= 0 (0 = the labels')")
        phases = parse_phases(self.phases, f"{p}.phases")
        _check(not phases or sum(n for _, n in phases) >= 1, f"{p}.phases", "name at least one epoch")
        _check(0 <= self.label_smoothing < 1, f"{p}.label_smoothing", "must be in [0, 1)")
        _check(0 <= self.full_top1 <= 1, f"{p}.full_top1", "a fraction in [0, 1] (0 = unknown)")
        _check(self.score_scale in SCORE_SCALES, f"{p}.score_scale", f"must be one of {', '.join(SCORE_SCALES)}")
        _check(0 <= self.score_weight <= 1, f"{p}.score_weight", "must be in [0, 1]")
        specs = [parse_spec(s) for s in self.strategies + self.floor_strategies]
        if any(s.topk for s in specs):
            _check(self.loss in ("kl", "kl_plain"), f"{p}.loss",
                   "top-k stored labels (@topK) replay probabilities (LPQLD), which only the kl losses take; "
                   "set evaluate.protocol to lpqld, fkd, rded or hald, or evaluate.loss to kl / kl_plain")
        if any(s.phases for s in specs):
            _check(bool(phases), f"{p}.phases", "a +phases strategy needs a phase schedule, e.g. "
                   "soft:75,hard:150,soft:75 (or evaluate.protocol=hald)")
        _check(self.cutmix_alpha >= 0, f"{p}.cutmix_alpha", "must be >= 0 (0 disables CutMix)")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        _check(self.ce_weight >= 0, f"{p}.ce_weight", "must be >= 0")
        _check(self.epochs >= 1, f"{p}.epochs", "must be >= 1")
        _check(self.batch_size >= 1, f"{p}.batch_size", "must be >= 1")
        _check(len(self.seeds) >= 1, f"{p}.seeds", "name at least one seed")
        for i, seed in enumerate(self.seeds):
            _check_seed(seed, f"{p}.seeds[{i}]")
        _check(all(n >= 2 for n in self.continual_steps), f"{p}.continual_steps", "each must be >= 2")
        for s in self.continual_strategies:
            _check(s in ("hard", "teacher", "projector"), f"{p}.continual_strategies",
                   f"{s!r}: continual runs use online labels (hard, teacher or projector)")
        _check(self.prune_pool in ("lpld", "random"), f"{p}.prune_pool", "must be 'lpld' or 'random'")
        _check(self.teacher_labels in ("observer", "window"), f"{p}.teacher_labels",
               "must be 'observer' or 'window'")
        _check(self.parallel in ("auto", "queue", "ddp"), f"{p}.parallel", "must be 'auto', 'queue' or 'ddp'"
               + (" ('rows' is now 'queue')" if self.parallel == "rows" else ""))
        _check(0 <= self.gpus_per_row <= 1, f"{p}.gpus_per_row", "must be in [0, 1] (0 = auto)")
        _check(self.label_precision in ("auto", "fp32", "bf16"), f"{p}.label_precision",
               "must be 'auto', 'fp32' or 'bf16'")
        _check(self.stored_views in ("per_seed", "first_seed"), f"{p}.stored_views",
               "must be 'per_seed' or 'first_seed'")
        _check(self.precision in ("fp32", "bf16"), f"{p}.precision", "must be 'fp32' or 'bf16'")
        _check(self.loss_check_every >= 1, f"{p}.loss_check_every", "must be >= 1")


@dataclass
class SweepConfig:
    conv_ranks: list[int] = _help("LoRA conv ranks to sweep", default_factory=lambda: [4, 8, 12, 16])
    head_rank_per_conv_rank: int = _help("head rank = this x conv rank (proportional)", default=16)
    # The published grid ends at 51-91, one epoch past a 90-epoch trajectory: its last window
    # is shifted to 50-90 so every window names trained checkpoints.
    windows: list[str] = _help("teacher windows to sweep", default_factory=lambda: [
        "1-41", "11-51", "21-61", "31-71", "41-81", "50-90"])
    n_teachers: int = _help("checkpoints per swept window (0 = transfer.n_teachers); short "
                            "trajectories (smoke, demo) need fewer than 9 for several windows", default=0)
    scheduler: str = _help("fifo | asha", default="fifo")
    max_concurrent: int = _help("trials at once", default=1)
    scores: bool = _help("also score each trial's projector with DD-Ranking's LRS (adds its hard-label and "
                         "random-image rows; A(full) from evaluate.full_top1 or evaluate.full_data); the "
                         "report's second heat map", default=False)

    def validate(self, p: str = "sweep") -> None:
        _check(self.scheduler in ("fifo", "asha"), f"{p}.scheduler", "must be 'fifo' or 'asha'")
        for w in self.windows:
            parse_window(w, f"{p}.windows")
        _check(all(r >= 1 for r in self.conv_ranks), f"{p}.conv_ranks", "ranks must be >= 1")
        _check(self.head_rank_per_conv_rank >= 1, f"{p}.head_rank_per_conv_rank", "must be >= 1")
        _check(self.n_teachers >= 0, f"{p}.n_teachers", "must be >= 0 (0 = transfer.n_teachers)")
        _check(self.max_concurrent >= 1, f"{p}.max_concurrent", "must be >= 1")
