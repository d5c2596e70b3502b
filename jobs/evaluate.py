"""Student evaluation (METHOD.md stages 5-6): every label strategy on the distilled images.

    python jobs/evaluate.py                                   # demo preset, local Ray
    python jobs/evaluate.py --preset smoke evaluate.strategies=[hard,projector] evaluate.seeds=[0]
    python jobs/evaluate.py evaluate.students=[resnet18,mobilenet_v2] evaluate.continual_steps=[5,10]
    ray job submit --working-dir . -- python jobs/evaluate.py --preset imagenet1k data.source=s3://...

The artifacts it needs (teachers, selection, projector, refined images) are reused when finished
(same config -> same key) or made first. Prints the accuracy vs label-bytes table and, where the
grid has the rows they need, DD-Ranking's fair scores.
"""
import sys

from hello_ray.cli.distill import stage_job
from hello_ray.formats.results import RESULTS_PARQUET, format_table, read_results
from hello_ray.recipe import run_evaluate
from hello_ray.scores import format_scores


def main(argv: list[str]) -> int:
    _, store, key = stage_job(argv, run_evaluate, __doc__.splitlines()[0])
    print()
    print(format_table(read_results(store, key)))
    scores = store.manifest(key).get("summary", {}).get("scores")
    if scores:
        print("\n" + format_scores(scores))
    print(f"\nresults: {store.uri_for(key, RESULTS_PARQUET)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
