"""Typed configuration: one dataclass per stage, YAML presets, ``key=value`` overrides.

Defaults are the published settings of METHOD.md (ImageNet-1K); presets in
``hello_ray/presets/*.yaml`` (package data: an installed wheel carries them) override them.
Every value is checked before any compute starts: an unknown key, a value of the wrong type, a
non-finite number (YAML's ``.inf``/``.nan``) or a number outside its range fails with the dotted
key in the message (tests/test_config.py holds the range of every numeric key).
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any

import yaml

# Inside the package, not beside it: a wheel installed anywhere carries its presets.
PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


SEED_LIMIT = 2**32  # numpy's seeds are 32-bit; torch and random take these too


def _check_seed(seed: int, key: str) -> None:
    _check(0 <= seed < SEED_LIMIT, key, f"must be in [0, 2**32), got {seed}")


TRAIN_CROPS = ("whole", "centre_square")


@dataclass
class DataConfig:
    source: str = _help("'demo' (bundled digits) or the dataset root: a local path, file:// or s3:// URI",
                        default="demo")
    format: str = _help("auto | imagefolder | parquet | webdataset", default="auto")
    image_size: int = _help("side of the square training images (224 for ImageNet, 32 for the demo)",
                            default=224)
    train_split: str = _help("sub-folder / shard prefix of the training split", default="train")
    val_split: str = _help("sub-folder / shard prefix of the validation split", default="val")
    on_corrupt: str = _help("what to do with an undecodable image: skip (count and report) | fail",
                            default="skip")
    class_names: list[str] | dict[str, str] = _help(
        "readable class names for the CLIP prompts: a mapping class folder (or class key) -> name, "
        "resolved by folder name, or a list matched by position to the sorted folders (the pairing "
        "is logged); empty = derive (ImageNet synsets are mapped automatically)", default_factory=list)
    max_per_class: int = _help("use at most this many training images per class (0 = all)", default=0)
    train_crop: str = _help("where the training stages (teachers, transfer) cut each RandomResizedCrop: "
                            "whole (over the whole decoded image, as torchvision's ImageNet recipe; drawn "
                            "as the image is decoded) | centre_square (over the centred image_size square "
                            "every image is first resized to; drawn on the worker's device, seeded)",
                            default="whole")
    decode: str = _help("where the training images are decoded for teachers, transfer and select: auto "
                        "(worker where the stages hold GPUs, else tasks) | tasks (Ray Data CPU tasks) | worker "
                        "(the Train workers and select's scoring actors, in batches on their device: nvJPEG "
                        "on a GPU, crops cut there; the CPUs only read files)", default="auto")
    cpus_per_task: float = _help("CPUs each read/decode task asks for; below 1 where fractional "
                                 "reservations (Tune trials, half-CPU workers) leave < 1 CPU free",
                                 default=1.0)

    def validate(self, p: str = "data") -> None:
        _check(bool(self.source), f"{p}.source",
               "set the dataset root, e.g. data.source=s3://my-bucket/imagenet (or 'demo')")
        _check(self.format in ("auto", "imagefolder", "parquet", "webdataset"), f"{p}.format",
               f"unknown format {self.format!r}")
        _check(self.on_corrupt in ("skip", "fail"), f"{p}.on_corrupt", "must be 'skip' or 'fail'")
        _check(self.decode in ("auto", "tasks", "worker"), f"{p}.decode", "must be one of auto, tasks, worker")
        _check(self.train_crop in TRAIN_CROPS, f"{p}.train_crop", f"must be one of {', '.join(TRAIN_CROPS)}")
        _check(8 <= self.image_size <= 1024, f"{p}.image_size", "must be in [8, 1024]")
        _check(self.max_per_class >= 0, f"{p}.max_per_class", "must be >= 0")
        _check(self.cpus_per_task > 0, f"{p}.cpus_per_task", "must be > 0")
        items = self.class_names.items() if isinstance(self.class_names, dict) else enumerate(self.class_names)
        for k, name in items:
            _check(bool(str(name).strip()), f"{p}.class_names", f"the name of {k!r} is empty")


@dataclass
class ComputeConfig:
    num_workers: int = _help("Ray Train workers (DDP ranks) per training stage", default=8)
    use_gpu: bool = _help("one GPU per Train worker / scoring actor", default=True)
    cpus_per_worker: float = _help("CPUs reserved per Train worker", default=1.0)
    max_failures: int = _help("restarts from the last checkpoint before a training stage gives up",
                              default=2)
    address: str = _help("Ray address ('' = connect to a running cluster or start a local one)",
                         default="")
    lease_wait: bool = _help("when another driver is writing a stage's artifact: wait, then reuse it "
                             "(true) or refuse at once (false; the --no-wait flag)", default=True)
    lease_ttl_s: float = _help("seconds a writer's lease on an artifact outlives its last renewal "
                               "(renewed every third of it): how soon a crashed driver's key frees",
                               default=60.0)
    dashboard: bool = _help("start Ray's dashboard with a local Ray this driver starts (a cluster it "
                            "joins keeps its own); off saves about 6 s of start-up on 2 cores", default=True)

    def validate(self, p: str = "compute") -> None:
        _check(self.num_workers >= 1, f"{p}.num_workers", "must be >= 1")
        _check(self.cpus_per_worker > 0, f"{p}.cpus_per_worker", "must be > 0")
        _check(self.max_failures >= 0, f"{p}.max_failures", "must be >= 0")
        _check(self.lease_ttl_s >= 1, f"{p}.lease_ttl_s", "must be >= 1 (seconds)")


@dataclass
class TeacherConfig:
    model: str = _help("teacher architecture from the zoo", default="resnet18")
    epochs: int = _help("epochs of the trajectory (one checkpoint each)", default=90)
    batch_size: int = _help("global batch size", default=256)
    lr: float = _help("SGD learning rate", default=0.1)
    momentum: float = _help("SGD momentum", default=0.9)
    weight_decay: float = _help("SGD weight decay", default=1e-4)
    lr_step: int = _help("StepLR step size in epochs", default=30)
    lr_gamma: float = _help("StepLR decay factor", default=0.1)
    observer: str = _help("'last' | 'epoch:N' | 'torchvision' (ImageNet-1K weights, needs download)",
                          default="last")
    seed: int = _help("seed of initialisation and data order", default=0)
    precision: str = _help("the forward and the loss: fp32 (the references') | bf16 (autocast; for GPUs "
                           "with native bf16, where it is about twice as fast)", default="fp32")

    def validate(self, p: str = "teachers") -> None:
        for k in ("epochs", "batch_size", "lr_step"):
            _check(getattr(self, k) >= 1, f"{p}.{k}", "must be >= 1")
        _check(self.lr > 0, f"{p}.lr", "must be > 0")
        _check(0 <= self.momentum < 1, f"{p}.momentum", "must be in [0, 1) (1 or more never forgets a step)")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        _check(0 < self.lr_gamma <= 1, f"{p}.lr_gamma", "must be in (0, 1] (the factor StepLR decays by)")
        _check_seed(self.seed, f"{p}.seed")
        _check(self.observer in ("last", "torchvision") or self.observer.startswith("epoch:"),
               f"{p}.observer", "must be 'last', 'epoch:N' or 'torchvision'")
        _check(self.precision in ("fp32", "bf16"), f"{p}.precision", "must be 'fp32' or 'bf16'")


@dataclass
class SelectConfig:
    ipc: int = _help("synthetic images per class (of every images.source: rded, sre2l, lpld)", default=10)
    factor: int = _help("patches per side of a synthetic image (2 for ImageNet, 1 for <= 64 px)",
                        default=2)
    mipc: int = _help("real images per class considered", default=300)
    num_crop: int = _help("random-resized crops per real image", default=5)
    show: str = _help("how a crop is shown to the observer: pad (centred on the observer's mean colour "
                      "= zero after normalisation, RDED) | pad_black (on black [0,1] pixels) | resize "
                      "(up-sampled to full size)", default="pad")
    crop_source: str = _help("what crops are cut from: original (the decoded image at its own "
                             "resolution, RDED) | resized (resized + centre-cropped to data.image_size)",
                             default="original")
    max_side: int = _help("crop_source=original: a source's longer side is shrunk to this (memory "
                          "bound; ImageNet's ~500 px pass untouched)", default=1024)
    tile_order: str = _help("stitching: rded (image b, tile (r, c) = rank (r*factor + c)*ipc + b) | "
                            "rowmajor (image b = ranks b*f^2 .. b*f^2 + f^2 - 1)", default="rded")
    mipc_order: str = _help("which mipc images of a class compete: random (seeded, RDED) | first "
                            "(in dataset order)", default="random")
    batch_size: int = _help("crops per scoring batch", default=256)
    num_actors: int = _help("observer scoring actors", default=1)
    actor_cpus: float = _help("CPUs per scoring actor; keep < 1 on CPU so read tasks are not starved",
                              default=0.5)
    seed: int = _help("seed of the crop boxes (per image, reproducible)", default=0)

    def validate(self, p: str = "select") -> None:
        for k in ("ipc", "factor", "mipc", "num_crop", "batch_size", "num_actors"):
            _check(getattr(self, k) >= 1, f"{p}.{k}", "must be >= 1")
        _check(self.show in ("pad", "pad_black", "resize"), f"{p}.show", "must be 'pad', 'pad_black' or 'resize'")
        _check(self.crop_source in ("original", "resized"), f"{p}.crop_source", "must be 'original' or 'resized'")
        _check(self.tile_order in ("rded", "rowmajor"), f"{p}.tile_order", "must be 'rded' or 'rowmajor'")
        _check(self.mipc_order in ("random", "first"), f"{p}.mipc_order", "must be 'random' or 'first'")
        _check(self.max_side >= 8, f"{p}.max_side", "must be >= 8")
        _check(self.actor_cpus > 0, f"{p}.actor_cpus", "must be > 0")
        _check_seed(self.seed, f"{p}.seed")


IMAGE_SOURCES = ("rded", "sre2l", "lpld", "external")
EXTERNAL_LAYOUTS = ("auto", "rded", "sre2l", "folders")
EXTERNAL_CLASS_ORDERS = ("index", "names")


@dataclass
class ImagesConfig:
    source: str = _help("where the distilled images come from: rded (select: RDED's patches of real images) | "
                        "sre2l (recover: synthesised against the observer's BatchNorm statistics, SRe2L) | "
                        "lpld (recover: one class per batch against that class's own statistics, LPLD) | "
                        "external (a distilled set made elsewhere, read from images.path)",
                        default="rded")
    path: str = _help("external: the distilled set's root (local path, file:// or s3://), one folder per "
                      "class with the images below it", default="")
    layout: str = _help("external: auto | rded (<class:05d>/class<c:05d>_id<i:05d>.jpg, RDED's output) | "
                        "sre2l (new<class:03d>/class<c:03d>_id<i:03d>.jpg, SRe2L's and LPLD's) | folders (any "
                        "class folders); auto picks rded or sre2l when every folder is named so, else folders",
                        default="auto")
    class_order: str = _help("external: how folders map to the training set's classes: index (rded/sre2l: the "
                             "number in the folder name is the training class index; folders: the i-th sorted "
                             "folder is class i) | names (each folder is named by a training class key or name)",
                             default="index")
    class_map: dict[str, str] = _help("external: explicit mapping folder -> training class (its key, e.g. a "
                                      "folder name or synset, or its readable name); overrides class_order; "
                                      "every folder must be mapped", default_factory=dict)
    resize: bool = _help("external: images whose size is not data.image_size x data.image_size are resized by "
                         "the package's rule (shorter side, centre crop); false: such an image is an error",
                         default=True)
    read_threads: int = _help("external: images read and decoded at once (I/O-bound; not in the key)",
                              default=16)

    def validate(self, p: str = "images") -> None:
        _check(self.source in IMAGE_SOURCES, f"{p}.source",
               f"unknown image source {self.source!r}; use one of {', '.join(IMAGE_SOURCES)}")
        _check(self.layout in EXTERNAL_LAYOUTS, f"{p}.layout",
               f"unknown layout {self.layout!r}; use one of {', '.join(EXTERNAL_LAYOUTS)}")
        _check(self.class_order in EXTERNAL_CLASS_ORDERS, f"{p}.class_order",
               f"unknown class order {self.class_order!r}; use one of {', '.join(EXTERNAL_CLASS_ORDERS)}")
        _check(self.read_threads >= 1, f"{p}.read_threads", "must be >= 1")
        if self.source == "external":
            _check(bool(self.path), f"{p}.path", "images.source=external reads the distilled set from "
                   "images.path; set it, e.g. images.path=s3://bucket/rded_imagenet_ipc10")
            _check(not (self.layout in ("rded", "sre2l") and self.class_order == "names" and not self.class_map),
                   f"{p}.class_order", f"layout {self.layout} names its folders by class index; use "
                   "class_order=index, or images.class_map for a mapping folder -> class")
        _check(len(set(self.class_map.values())) == len(self.class_map), f"{p}.class_map",
               "two folders map to the same class: "
               + ", ".join(sorted(f"{k} -> {v}" for k, v in self.class_map.items()
                                  if list(self.class_map.values()).count(v) > 1)))


# Defaults: the references' published ImageNet-1K runs (VILA-Lab/SRe2L @ 8d00cba SRe2L/recover/recover.sh
# and he-y/soft-label-pruning-for-dataset-distillation @ 63eee18 recover/scripts/imagenet1k_recover.sh:
# 4000 iterations, lr 0.25, r_bn 0.01, no TV / L2 prior; jitter 32 and first-BN multiplier 10 are
# both scripts' code defaults; SRe2L's batch is 100 classes, LPLD's the ipc images of one class).
@dataclass
class RecoverConfig:
    iterations: int = _help("Adam iterations per batch of synthesised images", default=4000)
    lr: float = _help("Adam learning rate on the normalised pixels (cosine to 0 over the iterations)",
                      default=0.25)
    r_bn: float = _help("weight of the BatchNorm-statistics term next to the cross-entropy", default=0.01)
    first_bn_multiplier: float = _help("extra weight of the first BatchNorm layer's term", default=10.0)
    jitter: int = _help("circular shift of up to this many pixels per iteration (32 at 224 px)", default=32)
    batch_size: int = _help("images optimised together: sre2l = classes per batch, one image each; lpld = "
                            "images of one class per batch, at most select.ipc", default=100)
    seed: int = _help("seed of the initial noise and the augmentation draws (per batch, reproducible)",
                      default=0)
    classes_per_step: int = _help(
        "lpld: one-class batches optimised together in one forward pass per iteration, each against its "
        "own class's BatchNorm statistics with its own draws and its loss summed, so each gets the "
        "gradient it gets alone (up to float rounding): a fuller GPU. 1 = one class at a time, as LPLD "
        "(bit for bit as before); sre2l: must be 1 (its batches already hold batch_size classes)", default=1)
    num_actors: int = _help("recover actors (one GPU each where used)", default=1)
    actor_cpus: float = _help("CPUs per recover / statistics actor; keep < 1 on CPU so read tasks are not "
                              "starved", default=0.5)
    stats_batch_size: int = _help("lpld: images per forward pass of the class-statistics pass", default=256)

    def validate(self, p: str = "recover") -> None:
        for k in ("iterations", "batch_size", "classes_per_step", "num_actors", "stats_batch_size"):
            _check(getattr(self, k) >= 1, f"{p}.{k}", "must be >= 1")
        _check(self.lr > 0, f"{p}.lr", "must be > 0")
        for k in ("r_bn", "first_bn_multiplier"):
            _check(getattr(self, k) >= 0, f"{p}.{k}", "must be >= 0")
        _check(self.jitter >= 0, f"{p}.jitter", "must be >= 0")
        _check(self.actor_cpus > 0, f"{p}.actor_cpus", "must be > 0")
        _check_seed(self.seed, f"{p}.seed")


@dataclass
class TransferConfig:
    clip_model: str = _help("open_clip model name", default="RN50")
    pretrained: str = _help("open_clip pretrained tag ('openai') or a local weights file", default="openai")
    conv_rank: int = _help("LoRA rank on every Conv2d of the image encoder", default=8)
    head_rank: int = _help("LoRA rank on the text-initialised head (64 for <= 100 classes, 128 for 1000)",
                           default=128)
    lora_style: str = _help("conv LoRA parametrisation: separable (k x 1 then 1 x k) | standard (peft)",
                            default="separable")
    lora_alpha_ratio: float = _help("LoRA alpha / rank (scaling of the update)", default=1.0)
    teacher_window: str = _help("'a-b': the multi-weak teachers, n checkpoints from epoch a to b",
                                default="11-51")
    n_teachers: int = _help("checkpoints in the teacher window", default=9)
    epochs: int = _help("epochs of knowledge transfer", default=20)
    batch_size: int = _help("global batch size", default=256)
    lr: float = _help("AdamW learning rate", default=5e-4)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    ce_weight: float = _help("weight of CE(true class) next to MSE(teacher logits)", default=0.1)
    adapter_dtype: str = _help("dtype of the shipped LoRA tensors: fp32 | fp16 | int8", default="fp16")
    seed: int = _help("seed", default=0)

    def validate(self, p: str = "transfer") -> None:
        for k in ("conv_rank", "head_rank", "n_teachers", "epochs", "batch_size"):
            _check(getattr(self, k) >= 1, f"{p}.{k}", "must be >= 1")
        _check(self.lora_style in ("separable", "standard"), f"{p}.lora_style",
               "must be 'separable' or 'standard'")
        _check(self.adapter_dtype in ("fp32", "fp16", "int8"), f"{p}.adapter_dtype",
               "must be fp32, fp16 or int8")
        _check(self.lr > 0, f"{p}.lr", "must be > 0 (a zero or negative rate trains nothing or diverges)")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        _check(self.ce_weight >= 0, f"{p}.ce_weight", "must be >= 0")
        _check(self.lora_alpha_ratio > 0, f"{p}.lora_alpha_ratio", "must be > 0")
        _check_seed(self.seed, f"{p}.seed")
        parse_window(self.teacher_window, f"{p}.teacher_window")


@dataclass
class RefineConfig:
    enabled: bool = _help("run the image update (METHOD.md stage 4)", default=True)
    steps: int = _help("Adam steps per image batch", default=300)
    lr: float = _help("Adam learning rate on the pixels", default=0.01)
    factor: int = _help("down/up-sampling factor of x' = up(down(x))", default=2)
    batch_size: int = _help("images per refine batch", default=100)
    num_actors: int = _help("refine actors (GPU actors where present)", default=1)
    actor_cpus: float = _help("CPUs per refine actor; keep < 1 on CPU so read tasks are not starved",
                              default=0.5)
    target: str = _help("x' = up(down(x)) of the current x each step: joint (gradient through both "
                        "E(x) and E(x')) | detached (E(x') is a fixed target of that step)",
                        default="joint")

    def validate(self, p: str = "refine") -> None:
        for k in ("steps", "factor", "batch_size", "num_actors"):
            _check(getattr(self, k) >= 1, f"{p}.{k}", "must be >= 1")
        _check(self.lr > 0, f"{p}.lr", "must be > 0")
        _check(self.actor_cpus > 0, f"{p}.actor_cpus", "must be > 0")
        _check(self.target in ("joint", "detached"), f"{p}.target", "must be 'joint' or 'detached'")


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


@dataclass
class Config:
    name: str = _help("run name (prefix of the report folder)", default="imagenet1k")
    store: str = _help("artifact store URI: a local path, file:// or s3://bucket/prefix",
                       default="./artifacts")
    s3_endpoint: str = _help("S3 endpoint for MinIO/Ceph/R2 ('' = AWS_ENDPOINT_URL_S3 / "
                             "AWS_ENDPOINT_URL / AWS)", default="")
    s3_timeout: float = _help("seconds an S3 request may wait for the server (boto3 and the pyarrow "
                              "filesystems handed to Ray alike)", default=60.0)
    s3_max_attempts: int = _help("attempts per S3 request, retries included (boto3 'standard' mode, "
                                 "pyarrow's AwsStandardS3RetryStrategy); Ray Data readers retry a "
                                 "failed read that many times again", default=3)
    store_shared: bool = _help("a local / file:// store is one file system that every Ray node mounts "
                               "(NFS, EFS, Lustre); without it a run on a multi-node cluster refuses a "
                               "local store, since each node's workers would write to their own disk",
                               default=False)
    data: DataConfig = field(default_factory=DataConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    teachers: TeacherConfig = field(default_factory=TeacherConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def validate(self) -> "Config":
        _check(math.isfinite(self.s3_timeout) and self.s3_timeout > 0, "s3_timeout",
               "must be a finite number of seconds > 0")
        _check(self.s3_max_attempts >= 1, "s3_max_attempts", "must be >= 1")
        _check(not (self.store_shared and self.store.startswith("s3://")), "store_shared",
               f"declares a local store shared between nodes, but store={self.store} is S3, which every "
               "node reaches already; remove store_shared")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v.validate(f.name)
        windows = [("transfer.teacher_window", self.transfer.teacher_window, self.transfer.n_teachers)]
        n_sweep = self.sweep.n_teachers or self.transfer.n_teachers
        windows += [("sweep.windows", w, n_sweep) for w in self.sweep.windows]
        for key, window, n in windows:
            lo, hi = parse_window(window, key)
            _check(hi <= self.teachers.epochs, key,
                   f"window {window} ends after the last teacher epoch ({self.teachers.epochs})")
            _check(hi - lo + 1 >= n, key, f"window {window} spans {hi - lo + 1} epochs, fewer than the "
                   f"{n} distinct teachers asked for (transfer.n_teachers / sweep.n_teachers)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_window(window: str, key: str = "teacher_window") -> tuple[int, int]:
    """``"11-51"`` -> ``(11, 51)``; epochs are 1-based and the window inclusive."""
    try:
        lo, hi = (int(x) for x in window.split("-"))
    except ValueError:
        raise ConfigError(f"config key '{key}': {window!r} is not a window 'a-b' (e.g. '11-51')") from None
    _check(1 <= lo <= hi, key, f"window {window!r} needs 1 <= a <= b")
    return lo, hi


# ---------------------------------------------------------------------------- loading

def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp`` (nanoGPT-style: no silent retyping)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, UnionType):  # e.g. a list of names or a mapping key -> name
        options = typing.get_args(tp)
        for option in options:
            if isinstance(value, typing.get_origin(option) or option):
                return _coerce(value, option, key)
        kinds = " or ".join("a list" if typing.get_origin(o) is list else "a mapping"
                            if typing.get_origin(o) is dict else getattr(o, "__name__", str(o)) for o in options)
        raise ConfigError(f"config key '{key}': expected {kinds}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML reads .inf / .nan as floats; no setting means either
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _merge(obj: Any, updates: dict[str, Any], prefix: str, source: str,
           explicit: set[str] | None = None) -> None:
    types = _field_types(type(obj))
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if explicit is not None:
            explicit.add(key)
        if k not in types:
            valid = ", ".join(sorted(types))
            raise ConfigError(f"unknown config key '{key}' (from {source}); valid keys here: {valid}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' (from {source}) is a section; give a mapping")
            _merge(cur, v, f"{key}.", source, explicit)
        elif typing.get_origin(types[k]) is dict and isinstance(v, dict) and isinstance(cur, dict):
            setattr(obj, k, {**cur, **_coerce(v, types[k], key)})  # per-key update of a table
        else:
            setattr(obj, k, _coerce(v, types[k], key))


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _target_type(cfg: Any, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj):
            return None
        tp = _field_types(type(obj)).get(part)
        obj = getattr(obj, part, None)
    return tp


def preset_path(preset: str) -> Path:
    """A preset name (``smoke``: ``PRESET_DIR/smoke.yaml``) or a path to a YAML file."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"preset file {path} not found (relative to {Path.cwd()}); the "
                              f"bundled presets are named without a path: {', '.join(preset_names())}")
        return path
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {preset!r}; presets in {PRESET_DIR}: {', '.join(preset_names())}")
    return path


def preset_names() -> list[str]:
    """The bundled presets, by the name ``--preset`` takes."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _load_yaml(path: Path, seen: tuple[str, ...] = ()) -> list[tuple[dict[str, Any], str]]:
    """A YAML file and the chain of presets it ``extends``, base first."""
    if str(path) in seen:
        raise ConfigError(f"preset cycle through {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("extends", None)
    chain = _load_yaml(preset_path(base), seen + (str(path),)) if base else []
    return chain + [(data, str(path))]


def load_config(preset: str | None = "demo", config_file: str | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Defaults <- preset YAML <- user YAML file <- ``key=value`` overrides, then validate.

    Values in overrides are parsed as YAML scalars/lists (``select.ipc=10``,
    ``evaluate.seeds=[0,1]``, ``data.source=s3://bucket/imagenet``).
    """
    cfg = Config()
    explicit: set[str] = set()   # dotted keys some layer set: an evaluation protocol leaves them alone
    layers: list[tuple[dict[str, Any], str]] = []
    if preset:
        layers += _load_yaml(preset_path(preset))
    if config_file:
        layers += _load_yaml(Path(config_file))
    for data, source in layers:
        _merge(cfg, data, "", source, explicit)
    if isinstance(overrides, dict):
        overrides = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. select.ipc=10)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if value is None or _target_type(cfg, key.strip()) is str:
            value = raw  # a string key keeps exactly what was typed ('1.0', 'null', ...)
        elif isinstance(value, str):
            # '1e-3' parses as a string in YAML 1.1; numbers are numbers.
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        _merge(cfg, _nest(key.strip(), value), "", "command line", explicit)
    apply_protocol(cfg.evaluate, explicit)
    return cfg.validate()


def apply_protocol(ev: "EvalConfig", explicit: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Set the keys ``evaluate.protocol`` decides (``PROTOCOLS``), except those given explicitly."""
    if ev.protocol not in PROTOCOLS:
        raise ConfigError(f"config key 'evaluate.protocol': {ev.protocol!r} is not one of {', '.join(PROTOCOLS)}")
    for k, v in PROTOCOLS[ev.protocol].items():
        if f"evaluate.{k}" not in explicit:
            setattr(ev, k, v)


def section_dict(cfg: Any) -> dict[str, Any]:
    """A stage config as a plain dict (the part of an artifact key that config contributes)."""
    return dataclasses.asdict(cfg)


# How a dataset is read, not what it holds: left out of artifact keys, so changing them reuses work.
# (Where images are decoded changes pixels by a resize kernel's rounding, as a GPU's arithmetic does.)
DATA_RUNTIME_FIELDS = ("cpus_per_task", "decode")
# How the training stages augment it: in the keys of those stages only.
DATA_TRAINING_FIELDS = ("train_crop",)


def data_identity(data: DataConfig, training: bool = False) -> dict[str, Any]:
    """The data section as it enters artifact keys: what is read, not how; ``training``: with the
    fields only the stages that train on the raw images use (teachers, transfer)."""
    drop = DATA_RUNTIME_FIELDS + (() if training else DATA_TRAINING_FIELDS)
    return {k: v for k, v in section_dict(data).items() if k not in drop}


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every config key, for ``--help-config``."""
    rows = []
    inst = cls()
    for f in dataclasses.fields(cls):
        v = getattr(inst, f.name)
        if dataclasses.is_dataclass(v):
            rows += describe(type(v), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", repr(v), f.metadata.get("help", "")))
    return rows
