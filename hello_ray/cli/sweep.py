"""``hello-ray sweep`` / ``python jobs/sweep.py``: Ray Tune over LoRA ranks and teacher windows
(:mod:`hello_ray.sweep`), then the grid's table, the best trial and the report's location."""
from __future__ import annotations

from hello_ray.cli.common import refused
from hello_ray.cli.distill import parse_args
from hello_ray.lease import LeaseHeld
from hello_ray.runtime import setup_logging, sigterm_exit
from hello_ray.sweep import format_sweep, sweep


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg = parse_args(argv, prog="sweep", description="Ray Tune over LoRA ranks and teacher windows")
    with sigterm_exit("sweep"):  # `ray job stop`: the leases are released, the next driver need not wait
        try:
            out = sweep(cfg)
        except LeaseHeld as e:  # --no-wait and another driver is writing the shared teachers/selection
            return refused("sweep", e)
    print()
    print(format_sweep(out["rows"]))
    if out["best"]:
        b = out["best"]
        print(f"\nbest: conv_rank={b['conv_rank']} head_rank={b['head_rank']} window={b['window']} "
              f"top1={100 * b['top1']:.2f}%")
    print(f"report:    {out['report_uri']}")
    print(f"wall time: {out['wall_s']:.1f} s")
    return 0
