"""One writer per artifact: a lease per key, on S3 and on local disk.

A driver that is about to run a stage takes the lease of the stage's artifact key first; a second
driver (the same config twice, ``distill`` beside ``sweep``, a colleague) finds it held and waits,
then reuses the finished artifact, or takes over when the owner died; or, with
``compute.lease_wait=false``, refuses at once (:class:`LeaseHeld`).

The lease is one small object per key, ``<store root>/_leases/<key>.json``::

    {"owner": "<uuid4 hex>", "host": "...", "pid": 123, "expires": <unix seconds>, "stage": "teachers"}

- **Acquire** is a conditional create: S3 ``PutObject`` with ``If-None-Match: *`` (AWS, MinIO and
  moto's server refuse it with 412 when the object exists); local: a fully written temp file
  hard-linked to the name (``link`` fails when the name exists: ``O_EXCL`` semantics with the
  content already complete).
- **Renewal**: the owner's thread rewrites the object with a new ``expires`` every ``ttl/3``, as a
  conditional overwrite against the version it wrote last (S3 ``If-Match: <etag>``; local: a
  compare-and-replace of the content's sha256 under a lock file). A failed precondition means
  someone took the lease over after it expired (the owner was paused or cut off): the lease is
  *lost*, and the owner stops (see fencing) instead of writing on.
- **Expiry and takeover**: a lease whose ``expires`` has passed belongs to nobody: a crashed
  driver's lease frees itself after at most ``ttl``. Taking it over is again a conditional
  overwrite against the expired version as read, so of two drivers taking over at once one wins.
- **Release** after finalize (and after a failure) is a conditional delete of our version.

**Fencing.** The workers of a stage (Ray Train ranks, actors) write through pickled copies of the
store. The owner registers a :class:`Fence` on its store (``store.fences[key]``) before the stage
starts, so every ``put_*`` into the key and the final manifest write first check that the lease is
still this owner's and valid for at least another ``ttl/3`` (the lease is re-read at most once
per ``ttl/3``: the check is cached up to ``expires - ttl/3``, which nobody can take over before).
A writer that lost its lease therefore fails its next write with :class:`LeaseLost`, before a
taker-over can have started. The residual window is a write that passed its check and then took
longer than ``ttl/3`` to land (a paused process, a huge upload); hosts' clocks are assumed to agree
within a few seconds (NTP). The owner's driver learns of the loss from its renewal thread, and
``Run.done`` re-proves the lease (one conditional write) before finalizing. Ray Train's checkpoint
uploads go through Ray, not the store: teachers writes each epoch file *before* its checkpoint, so
a fenced rank stops before checkpointing; transfer and evaluate report checkpoints between store
writes, so a stale run of theirs may add checkpoints under ``_ray/<key>`` until its next write.
That never reaches the new owner's files; it matters only if the new owner dies too and a third
resumes (from a checkpoint of the same config either way).

**What a finished artifact holds.** Writers of a key follow each other, never overlap. When a
writer takes an unfinished key, whatever the earlier attempt left there is either resume state or
garbage, and :func:`prepare_key` decides which with one rule: if the key has Ray run state
(``<store>/_ray/<key>``: a Ray Train stage that got as far as starting its run), the files are the
state that run resumes with (teachers' epoch files up to its last checkpoint, evaluate's stored
labels) and are kept (so are the files of a stage that resumes from its own files: recover, whose
batches each write their images and then a marker), exactly as a Ray Train restart inside one driver keeps them, and the resumed
run rewrites everything after its checkpoint; otherwise (select, refine, or a run that never
started) every file is removed, so the new attempt starts clean. Stale ``.partial`` temp files
are removed in both cases (their writers are gone: the lease is ours). So the manifest lists the
files of one lineage of attempts, each continuing the previous one's Ray checkpoint, never files
of two writers at once.
"""
from __future__ import annotations

from hello_ray.lease.backends import (  # noqa: F401 (re-exported)
    log,
    DEFAULT_TTL_S,
    LeaseHeld,
    LeaseLost,
    LeaseInfo,
    _LocalLeases,
    _S3Leases,
    _backend,
    read_lease,
    lease_active,
)
from hello_ray.lease.writer import (  # noqa: F401 (re-exported)
    Fence,
    Lease,
    acquire,
    _ray_state_exists,
    prepare_key,
)
