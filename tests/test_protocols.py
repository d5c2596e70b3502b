"""Named evaluation protocols (hello | rded | fkd): what each sets, the schedules' end points, the
losses on a fixed batch against hand-computed values, which epochs are scored, weight decay groups."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from hello_ray.config import PROTOCOLS, load_config
from hello_ray.labels import LabelContext
from hello_ray.stages.evaluate_core import (TrainSettings, lr_factor, param_groups, scored_epochs, student_loss,
                                            train_student)


@pytest.mark.parametrize("protocol,loss,temperature,ce_weight,schedule,decay,report", [
    ("hello", "mse_ce", 4.0, 0.025, "cosine_step", "all", "final"),
    ("rded", "kl_plain", 20.0, 0.0, "half_cosine_epoch", "weights", "rded_best"),
    ("fkd", "kl_plain", 20.0, 0.0, "cosine_epoch", "weights", "fkd_best"),
])
def test_protocol_sets_its_keys_and_explicit_keys_win(protocol, loss, temperature, ce_weight, schedule, decay,
                                                      report):
    ev = load_config("demo", overrides=[f"evaluate.protocol={protocol}"]).evaluate
    assert (ev.loss, ev.temperature, ev.ce_weight, ev.schedule, ev.decay, ev.report) == \
        (loss, temperature, ce_weight, schedule, decay, report)
    mine = load_config("demo", overrides=[f"evaluate.protocol={protocol}", "evaluate.temperature=3",
                                          "evaluate.report=final"]).evaluate
    assert mine.temperature == 3.0 and mine.report == "final" and mine.loss == loss
    assert set(PROTOCOLS[protocol]) == {"loss", "ce_weight", "temperature", "schedule", "decay", "report"}


def test_students_learning_rates_are_rdeds():
    lr = load_config("demo").evaluate.lr
    assert lr == {"resnet18": 1e-3, "shufflenet_v2_x0_5": 1e-3, "mobilenet_v2": 2.5e-3,
                  "efficientnet_b0": 2e-3, "swin_v2_t": 1e-4, "vgg11": 5e-4, "vit_b_16": 1e-4,
                  "conv3": 1e-3, "conv4": 1e-3, "conv5": 1e-3, "conv6": 1e-3}   # argument.py l. 276-306


@pytest.mark.parametrize("schedule,epochs,first,last", [
    ("half_cosine_epoch", 300, 1.0, 0.5 * (1 + math.cos(math.pi * 299 / 300 / 2))),   # RDED: ends near 0.5
    ("half_cosine_epoch", 4, 1.0, 0.5 * (1 + math.cos(math.pi * 3 / 8))),
    ("cosine_epoch", 300, 1.0, 0.5 * (1 + math.cos(math.pi * 299 / 300))),             # FKD: ends near 0
    ("cosine_epoch", 2, 1.0, 0.5),
])
def test_epoch_schedule_end_points(schedule, epochs, first, last):
    assert lr_factor(schedule, 0, epochs) == pytest.approx(first)
    assert lr_factor(schedule, epochs - 1, epochs) == pytest.approx(last)


def _settings(**kw) -> TrainSettings:
    base = dict(epochs=4, batch_size=4, lr=1e-3, weight_decay=0.01, cutmix_alpha=1.0, loss="kl_plain",
                ce_weight=0.0, temperature=20.0, image_size=8, schedule="half_cosine_epoch", decay="weights",
                report="rded_best")
    return TrainSettings(**{**base, **kw})


def test_rded_training_runs_each_epoch_at_its_half_cosine_rate():
    """lr during epoch e = lr x 0.5 (1 + cos(pi e / E / 2)), stepped after each epoch (RDED)."""
    from hello_ray.labels import HardLabels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(8) % 3
    lines: list[str] = []
    stats = train_student(model, images, labels, HardLabels(labels.numpy(), 3, 0), _settings(), seed=0,
                          device=torch.device("cpu"), log=lines.append, score=lambda: 0.5)
    lrs = [float(re.search(r"lr ([0-9.e+-]+)", line).group(1)) for line in lines]
    want = [1e-3 * 0.5 * (1 + math.cos(math.pi * e / 4 / 2)) for e in range(4)]
    assert lrs == pytest.approx(want, rel=1e-2)
    assert lrs[0] == pytest.approx(1e-3, rel=1e-2) and lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(3 * math.pi / 8)), rel=1e-2)
    assert stats["steps"] == 4 * 2 and set(stats["scores"]) == {4}   # E = 4: only the last epoch is > 0.8 E


def test_losses_on_a_fixed_batch_equal_hand_computed_values():
    t = 20.0
    out = torch.tensor([[0.0, 0.0]])                           # student: uniform, q = (1/2, 1/2)
    target = torch.tensor([[t * math.log(3.0), 0.0]])          # label: p = softmax(target / T) = (3/4, 1/4)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)   # 0.130812...
    ctx = LabelContext(y_a=torch.tensor([0]), y_b=torch.tensor([1]), lam=0.75, num_classes=2)
    plain = student_loss(out, target, ctx, True, _settings(loss="kl_plain"))
    hinton = student_loss(out, target, ctx, True, _settings(loss="kl"))
    assert float(plain) == pytest.approx(kl, rel=1e-5)         # RDED / SRe2L: no T^2
    assert float(hinton) == pytest.approx(kl * t * t, rel=1e-5)
    mse_ce = student_loss(out, target, ctx, True, _settings(loss="mse_ce", ce_weight=0.025))
    mse = (t * math.log(3.0)) ** 2 / 2
    ce = 0.75 * math.log(2) + 0.25 * math.log(2)               # both classes at 1/2
    assert float(mse_ce) == pytest.approx(mse + 0.025 * ce, rel=1e-5)


@pytest.mark.parametrize("report,epochs,expected", [
    ("final", 300, [299]),
    ("rded_best", 300, list(range(249, 300, 10))),             # e % 10 == 9 and e > 0.8 E (0-based)
    ("rded_best", 15, [14]),
    ("rded_best", 100, [89, 99]),
    ("fkd_best", 25, [0, 10, 20, 24]),
    ("fkd_best", 300, list(range(0, 300, 10)) + [299]),
])
def test_scored_epochs(report, epochs, expected):
    assert scored_epochs(report, epochs) == expected


def test_weight_decay_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    groups = param_groups(model, 0.01, "weights")
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[0].weight), id(model[3].weight)}  # conv and linear weights only
    assert len(groups[1]["params"]) == 4                      # conv bias, BN weight + bias, linear bias
    assert param_groups(model, 0.01, "all")[0]["params"] == list(model.parameters())


def test_rded_protocol_on_the_demo_preset():
    """`evaluate.protocol=rded` on the demo: the student settings the evaluate stage builds."""
    from hello_ray.stages.evaluate import settings_for

    s = settings_for(load_config("demo", overrides=["evaluate.protocol=rded"]), "resnet18")
    assert (s.loss, s.temperature, s.ce_weight, s.schedule, s.decay, s.report) == \
        ("kl_plain", 20.0, 0.0, "half_cosine_epoch", "weights", "rded_best")
    assert (s.lr, s.epochs, s.weight_decay, s.cutmix_alpha) == (1e-3, 15, 0.01, 1.0)
    assert lr_factor(s.schedule, 0, s.epochs) == 1.0
    assert lr_factor(s.schedule, s.epochs - 1, s.epochs) == pytest.approx(0.5 * (1 + math.cos(math.pi * 14 / 30)))
    assert scored_epochs(s.report, s.epochs) == [14]          # 15 epochs: only the last is > 0.8 E
