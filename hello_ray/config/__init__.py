"""Typed configuration: one dataclass per stage, YAML presets, ``key=value`` overrides.

Defaults are the published settings of METHOD.md (ImageNet-1K); presets in
``hello_ray/presets/*.yaml`` (package data: an installed wheel carries them) override them.
Every value is checked before any compute starts: an unknown key, a value of the wrong type, a
non-finite number (YAML's ``.inf``/``.nan``) or a number outside its range fails with the dotted
key in the message (tests/test_config.py holds the range of every numeric key).
"""
from __future__ import annotations

# The package's one face (sections.py: data .. refine and the shared rules; evaluate.py: evaluate and
# sweep; loader.py: Config, presets, overrides, keys' view of it).
from hello_ray.config.sections import (  # noqa: F401 (re-exported)
    ComputeConfig,
    ConfigError,
    DataConfig,
    EXTERNAL_CLASS_ORDERS,
    EXTERNAL_LAYOUTS,
    IMAGE_SOURCES,
    ImagesConfig,
    PRESET_DIR,
    RecoverConfig,
    RefineConfig,
    SEED_LIMIT,
    SelectConfig,
    TRAIN_CROPS,
    TeacherConfig,
    TransferConfig,
    parse_window,
    _check,
    _check_seed,
    _help,
)
from hello_ray.config.evaluate import (  # noqa: F401 (re-exported)
    EvalConfig,
    LABEL_STRATEGIES,
    PROTOCOLS,
    SweepConfig,
)
from hello_ray.config.loader import (  # noqa: F401 (re-exported)
    Config,
    DATA_RUNTIME_FIELDS,
    DATA_TRAINING_FIELDS,
    apply_protocol,
    data_identity,
    describe,
    load_config,
    preset_names,
    preset_path,
    section_dict,
)
