"""``hello-ray preflight``: know before paying for a run whether it would start and every stage
could take a step.

- :mod:`.checks`: no compute: the config, the store (a probe written, read back, deleted), the data
  (layout, classes, split sizes, a decoded sample), class names, pretrained weights, and whether the
  cluster (live, or an autoscaler YAML's node types) can hold what each stage asks for;
- :mod:`.rehearsal`: a few real steps of every stage at the preset's real shapes, timed, with peak
  memory and FLOPs per item (``torch.utils.flop_counter``);
- :mod:`.cost`: the full run's work, bytes and time (this machine, and named accelerators from
  ``devices.yaml``);
- :mod:`.cli`: the command, the table, ``--json``, and the JSON kept in the store for the report.
"""
