"""The evaluate and sweep sections: label strategies, the evaluation protocols (``PROTOCOLS``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


from hello_ray.config.sections import (
    parse_window,
    _check,
    _check_seed,
    _help,
)

LABEL_STRATEGIES = ("hard", "teacher", "stored", "projector")

def _check_strategy(spec: str, key: str) -> None:
    """A label strategy spec: hard | teacher | stored | stored/N (integer N >= 1) | projector."""
    base, _, prune = spec.partition("/")
    _check(base in LABEL_STRATEGIES, key, f"unknown label strategy {spec!r}")
    _check(not prune or (base == "stored" and prune.isdigit() and int(prune) >= 1),
           key, f"{spec!r}: only stored/N with integer N takes a prune ratio")


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
}


@dataclass
class EvalConfig:
    students: list[str] = _help("student architectures", default_factory=lambda: ["resnet18"])
    strategies: list[str] = _help("label strategies: hard | teacher | stored | stored/N (LPLD prune "
                                  "1/N) | projector", default_factory=lambda: ["projector"])
    epochs: int = _help("student epochs", default=300)
    batch_size: int = _help("global batch size", default=100)
    protocol: str = _help("evaluation protocol: hello (METHOD.md) | rded (LINs-lab/RDED validation/main.py) | "
                          "fkd (SRe2L/LPLD train_FKD.py); sets loss, temperature, ce_weight, schedule, "
                          "decay and report unless those keys are given", default="hello")
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
    temperature: float = _help("temperature of the kl losses", default=4.0)
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

    def validate(self, p: str = "sweep") -> None:
        _check(self.scheduler in ("fifo", "asha"), f"{p}.scheduler", "must be 'fifo' or 'asha'")
        for w in self.windows:
            parse_window(w, f"{p}.windows")
        _check(all(r >= 1 for r in self.conv_ranks), f"{p}.conv_ranks", "ranks must be >= 1")
        _check(self.head_rank_per_conv_rank >= 1, f"{p}.head_rank_per_conv_rank", "must be >= 1")
        _check(self.n_teachers >= 0, f"{p}.n_teachers", "must be >= 0 (0 = transfer.n_teachers)")
        _check(self.max_concurrent >= 1, f"{p}.max_concurrent", "must be >= 1")
