"""Stage 1 alone: train the teacher trajectory and print where it went and its accuracy curve.

    python jobs/train_teachers.py                                  # demo preset, local Ray
    python jobs/train_teachers.py --preset smoke --store s3://bucket/runs
    ray job submit --working-dir . -- python jobs/train_teachers.py --preset imagenet1k \
        data.source=s3://my-bucket/imagenet store=s3://my-bucket/hello_ray
"""
import sys

from hello_ray.cli.distill import stage_job
from hello_ray.formats.trajectory import load_trajectory
from hello_ray.recipe import run_teachers
from hello_ray.stages.teachers import observer_file


def main(argv: list[str]) -> int:
    cfg, store, key = stage_job(argv, run_teachers, "Train the teacher trajectory (stage 1)")
    traj = load_trajectory(store, key)
    # The trajectory holds every epoch; which one observes is the config's choice (teachers.observer).
    observer = observer_file(cfg.teachers.observer, cfg.teachers.epochs) or "torchvision's ImageNet-1K weights"
    print(f"\nteachers: {store.uri_for(key)}  ({traj['model']}, {traj['num_classes']} classes)")
    print(f"observer: {observer} (teachers.observer={cfg.teachers.observer})   "
          f"wall time: {store.manifest(key)['summary']['wall_s']} s")
    print("epoch  top1")
    for e in traj["epochs"]:
        print(f"{e['epoch']:5d}  {100 * e['top1']:6.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
