"""Label strategies: who labels the student's augmented views, and what that costs to ship.

One interface, five ways of labelling, and their variants (``label_spec.py``) (METHOD.md, "Label strategies the system compares"):

| name        | ``label(views, ctx)`` returns               | ``shipped_bytes()`` counts                  |
|-------------|---------------------------------------------|---------------------------------------------|
| hard        | the CutMix-mixed one-hot target [N, C]      | the class-id array as written to the store  |
| teacher     | observer (or window-mean) logits [N, C]     | the teacher state_dict(s), serialized       |
| stored      | the fp16 logits written by a relabel pass   | every file under ``labels/<name>/``         |
| stored/N    | the same, from a pool of 1/N of the batches | (fewer files, fewer bytes)                  |
| stored@topK | softmax of the k kept logits at the epoch's temperature, in C zeros (LPQLD) | k fp16 + k int16 per view |
| projector   | CLIP + merged LoRA logits [N, C]            | the adapter files of the transfer artifact  |

Bytes are always real bytes (files written to the store, or weights serialized), never a formula;
``hello-ray storage`` gives the formula to compare against.

Online labellers run in eval mode under ``torch.inference_mode`` (bf16 autocast + channels-last on
GPU), so labelling costs one forward and no autograd memory. ``stored`` strategies are *replayed*:
the student loop asks them for the exact views (crop boxes, flips, CutMix perm/lambda/box) the
relabel pass labelled, rebuilds those views (``views.View.materialise``) and gets the stored logits
back. This module sits below the stages and never imports them.
"""
from __future__ import annotations

from hello_ray.labels.online import (  # noqa: F401 (re-exported)
    LABELS_DIR,
    log,
    ClassCountMismatch,
    LabelError,
    LabelContext,
    LabelStrategy,
    _serialized_size,
    LABEL_PRECISIONS,
    prepare_labeller,
    _warned_emulated,
    _warn_emulated_bf16,
    _OnlineModel,
    HardLabels,
    TeacherLabels,
    ProjectorLabels,
)
from hello_ray.labels.stored import (  # noqa: F401 (re-exported)
    meta_file,
    stored_name,
    PRUNE_POOLS,
    lpld_pool_size,
    RelabelPlan,
    _pack,
    _unpack,
    relabel,
    write_stored_meta,
    StoredLabels,
    check_classes,
    prune_stored,
    top_k_view,
    replay_top_k,
    top_k_stored,
)
from hello_ray.label_spec import (  # noqa: F401 (re-exported)
    StrategySpec,
    StrategySpecError,
    parse_spec,
    parse_strategy,
)
