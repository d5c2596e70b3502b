"""The config's sections up to refine (one dataclass per stage, each with its ``validate``), and the
rules they share: ``ConfigError``, ``_help`` (a field's help text), ``_check``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# Inside the package, not beside it: a wheel installed anywhere carries its presets.
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


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

def parse_window(window: str, key: str = "teacher_window") -> tuple[int, int]:
    """``"11-51"`` -> ``(11, 51)``; epochs are 1-based and the window inclusive."""
    try:
        lo, hi = (int(x) for x in window.split("-"))
    except ValueError:
        raise ConfigError(f"config key '{key}': {window!r} is not a window 'a-b' (e.g. '11-51')") from None
    _check(1 <= lo <= hi, key, f"window {window!r} needs 1 <= a <= b")
    return lo, hi
