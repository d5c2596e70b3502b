"""The Ray Train failure policy of every training stage: Ray's default (restart from the last
checkpoint up to ``compute.max_failures`` times), except that a fatal error
(:mod:`hello_ray.failures`: a non-finite loss, a full disk, a data error) ends the run at once.

Ray Train V2 has no public switch for this: :func:`hello_ray.launcher.fit` hands the policy to
the controller it starts. The controller process unpickles it, so this module imports only Ray
and :mod:`hello_ray.failures` (no torch).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

from hello_ray.failures import worker_fatal

if TYPE_CHECKING:
    from ray.train import TrainingFailedError

log = logging.getLogger("hello_ray.launcher")


class NoRetryOnFatal(DefaultFailurePolicy):
    """Ray Train's default policy, except that a fatal worker error ends the run at once."""

    def make_decision(self, training_failed_error: "TrainingFailedError") -> FailureDecision:
        fatal = worker_fatal(training_failed_error)
        if fatal is not None:
            log.warning("not retrying (%s): %s", type(fatal).__name__, fatal)
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)
