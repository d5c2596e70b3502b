"""The dataset card of a package (its ``README.md``): what the set is, how it was made, what it
scored, what its labels cost, and how to train on it.

Built from the run's artifacts only (the evaluate manifest and results, the image set's meta, the
image grid of hello_ray/plots/image_grid.py through the report's own section), so the card says
what the run did, not what a config file says it should have done.
"""
from __future__ import annotations

import json
from typing import Any

from hello_ray.data.imageset import read_image_set_info
from hello_ray.formats.results import read_results, results_table, summarise
from hello_ray.store import Store
from hello_ray.tables import human_bytes, markdown_table

USAGE = '''```python
import hello_ray.distilled

pkg = hello_ray.distilled.open("{uri}")        # every file checked against manifest.json
pkg.images, pkg.labels, pkg.class_names        # uint8 [N, 3, H, W], int64 [N], list of names
data = pkg.torch_dataset()                     # (image float [3, H, W] in [0, 1], label)
labeller = pkg.labeller("projector", device="cuda")   # augmented [B, 3, H, W] in [0, 1] -> logits [B, C]
```'''


def _label_bytes(rows: list[dict[str, Any]], doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per label strategy of the run: the bytes it ships with the images, and whether this package has them."""
    shipped = {"hard": "yes (class folders)", "projector": "yes (adapter/)" if "projector" in doc["labels"] else "no",
               "teacher": "no (the teacher's weights stay with the run)"}
    seen: dict[str, int] = {}
    for r in rows:
        if r["images"] == "distilled" and not r.get("continual_steps"):
            seen[r["strategy"]] = max(seen.get(r["strategy"], 0), int(r["label_bytes"]))
    body = []
    for strategy, n in seen.items():
        has = shipped.get(strategy)
        if has is None:       # stored, stored/N
            has = "yes (labels/)" if "stored" in doc["labels"] else "no"
        body.append([strategy, f"{n:,}", human_bytes(n), has])
    return ["strategy", "label bytes", "size", "in this package"], body


def render_card(src: Store, evaluate_key: str, manifest: dict[str, Any], doc: dict[str, Any],
                class_names: list[str], package_uri: str) -> tuple[str, dict[str, bytes]]:
    """(the card's markdown, {png name: bytes}) for the package described by ``doc`` (package.json)."""
    from hello_ray.plots.image_grid import read_image_grid
    from hello_ray.report import images_section

    source = doc["source"]
    info = read_image_set_info(src, source["images"])
    rows = read_results(src, evaluate_key)
    n, c = doc["num_images"], doc["num_classes"]
    refined = " (refined on the projector)" if doc["refined"] else ""
    md = [f"# Distilled dataset: {n} images of {c} classes", "",
          f"A distilled training set made by hello_ray (HeLlO): {n} images of {c} classes "
          f"({info.get('ipc', '?')} per class), {doc['image_size']} x {doc['image_size']} px, "
          f"{doc['image_source']} images{refined}. A student trained only on these images, labelled "
          "online by the shipped projector (CLIP + a LoRA adapter), reaches the accuracy below on the "
          "real validation set. Labels shipped: " + ", ".join(doc["labels"]) + ".", ""]
    grid_md, pngs = images_section(read_image_grid(src, source["images"]))
    md += grid_md
    headers, body = results_table(summarise(rows))
    md += ["## Accuracy of the run", "",
           "Top-1 % on the real validation set of students trained only on these images, per label "
           "strategy (mean +- std over seeds), as the run's evaluate stage measured it.", "",
           markdown_table(headers, body), ""]
    headers, body = _label_bytes(rows, doc)
    md += ["## Label bytes", "", "What each label strategy ships besides the images (real bytes of its files).", "",
           markdown_table(headers, body), ""]
    if "projector" in doc["labels"]:
        p = doc["projector"]
        md += [f"The projector is the public CLIP `{p['model']}` (weights `{p['pretrained']}`, identity "
               f"`{p['pretrained_identity']}`) with LoRA ranks conv {p['conv_rank']} / head {p['head_rank']} "
               f"({p['style']}, stored {p['dtype']}); the head is recomputed from the class names. The run "
               f"labelled at precision `{p['label_precision']}`.", ""]
    inputs = [["evaluate", evaluate_key]] + [[role, key] for role, key in source.items()
                                            if role not in ("store", "evaluate") and key]
    md += ["## How it was made", "", f"From the run in `{source['store']}`; artifact keys "
           "(each key is a hash of its config and inputs):", "",
           markdown_table(["role", "artifact key"], inputs), ""]
    made = {k: info[k] for k in ("ipc", "factor", "image_source", "refine", "recover") if k in info}
    md += ["<details><summary>Configuration (the evaluate artifact's config, the image set's settings)</summary>",
           "", "```json", json.dumps({"evaluate_artifact": manifest.get("config"), "image_set": made},
                                     indent=1, sort_keys=True, default=str), "```", "", "</details>", "",
           "Versions of the run: " + ", ".join(f"{k} {v}" for k, v in sorted((manifest.get("versions") or {}).items())),
           "", "Versions of the export: " + ", ".join(f"{k} {v}" for k, v in sorted(doc["versions"].items())), ""]
    md += ["## How to use it", "", USAGE.format(uri=package_uri), "",
           "A complete training loop (torchvision student, CutMix, online projector labels, KL at a "
           "temperature) is `examples/train_on_package.py` in hello_ray, quoted in its docs/package.md under "
           "\"Using a distilled set\".", "",
           "## Files", "",
           "`images/<class index>-<name>/<image index>.png` (uint8 RGB; the image index is the set order "
           "that stored labels replay), `classes.json` (class order: class c is `class_names[c]`, in folder "
           "`folders[c]`), `package.json`, `adapter/` (projector), `labels/` (stored labels, if shipped), "
           "this card and its figures. `manifest.json`, written last, lists every file's size and sha256; "
           "`hello_ray.distilled.open` checks each file against it as it reads.", ""]
    return "\n".join(md), pngs
