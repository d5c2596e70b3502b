"""hello_ray/report.py: every section, real PNGs, table numbers equal to the input, and the
report written through the store API to a local folder and to the moto S3 server.

The results rows are the evaluate stage's own (its ``plan_rows`` plus the fields ``_train_row``
measures), written and read through hello_ray/formats/results.py: the one results schema."""
from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hello_ray import report
from hello_ray.formats.results import format_table
from hello_ray.config import load_config
from hello_ray.formats.fidelity import write_fidelity
from hello_ray.formats.results import summarise, write_results
from hello_ray.formats.trajectory import epoch_file, write_trajectory
from hello_ray.stages.evaluate import plan_rows
from hello_ray.store import open_store

STRATEGIES = {"hard": 1_200, "teacher": 46_827_520, "stored": 12_582_912, "stored/10": 1_258_291,
              "projector": 811_008}
SECTIONS = ["## Results", "### Accuracy vs label bytes", "## Teacher trajectory", "## Projector fidelity",
            "## Sweep", "## Storage accounting"]


def evaluate_rows(num_classes: int = 10, **evaluate: str) -> list[dict]:
    """The rows the evaluate stage plans for ``evaluate.<key>=<value>`` overrides, each with the
    fields ``evaluate._train_row`` adds (seeded measurements; ``label_bytes`` per STRATEGIES)."""
    evaluate = {"floor_strategies": "[hard]", **evaluate}   # the floor alone unless the test names controls
    cfg = load_config("smoke", overrides=[f"evaluate.{k}={v}" for k, v in evaluate.items()])
    rng = np.random.default_rng(0)
    rows = []
    for r in plan_rows(cfg, num_classes):
        val = 360 if not r["continual_steps"] else 36 * len(r["classes"])
        rows.append({**r, "top1": float(rng.uniform(0.2, 0.6)), "val_images": val,
                     "label_bytes": STRATEGIES[r["strategy"]], "train_images": 20, "wall_s": float(rng.uniform(5, 9)),
                     "step_s": float(rng.uniform(0.01, 0.05)), "steps": 4, "final_loss": float(rng.uniform(1, 2)),
                     "peak_mem_mb": float(rng.uniform(256, 1024)), "peak_mem_kind": "cpu_rss_peak",
                     "device": "cpu", "workers": 1, "parallel": "rows"})
    return rows


def make_rows() -> list[dict]:
    """One student, every strategy of STRATEGIES, three seeds (in plan order: strategy, then seed)."""
    return evaluate_rows(students="[resnet18]", strategies=f"[{','.join(STRATEGIES)}]", seeds="[0,1,2]",
                         floor="false", continual_steps="[]")


TRAJECTORY = {"model": "resnet18", "num_classes": 10, "image_size": 32, "class_names": [str(i) for i in range(10)],
              "epochs": [{"epoch": e, "top1": 1 - 0.8 ** e, "file": epoch_file(e)} for e in range(1, 11)]}
# The transfer stage's fidelity.json layout.
FIDELITY = {"before": {"views": 400, "agreement": 0.21, "kl": 1.734, "projector_top1": 0.12, "teacher_top1": 0.83},
            "after": {"views": 400, "agreement": 0.77, "kl": 0.2451, "projector_top1": 0.64, "teacher_top1": 0.83},
            "teacher_window": "2-10", "n_teachers": 9}
SWEEP = [{"conv_rank": r, "head_rank": 16 * r, "window": w, "top1": 0.3 + 0.01 * r + 0.02 * i,
          "agreement": 0.5, "stopped_early": False, "error": "", "lrs": 0.2 + 0.01 * r + 0.02 * i}
         for r in (2, 4) for i, w in enumerate(["1-2", "2-3"])]
STORAGE = {"classes": 10, "ipc": 10, "epochs": 40, "stored_soft_labels_bytes": 12_582_912,
           "teacher_params": 11_181_642, "projector_lora_params": 405_504,
           "projector_lora_bytes_fp16": 811_008, "clip_model": "hello-tiny-rn"}


def table_row(markdown: str, *cells: str) -> str:
    """The one markdown table line that starts with ``cells``."""
    prefix = "| " + " | ".join(cells) + " |"
    lines = [line for line in markdown.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"expected one row starting {prefix!r}, found {lines}"
    return lines[0]


def assert_png(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    img.load()  # decodes every pixel: a truncated file fails here
    assert img.width > 200 and img.height > 150
    assert np.asarray(img.convert("L")).std() > 5, "the plot is blank"
    return img.size


@pytest.fixture(scope="module")
def full_report() -> tuple[str, dict[str, bytes]]:
    return report.build_report(make_rows(), TRAJECTORY, FIDELITY, SWEEP, STORAGE,
                               title="test run", meta={"preset": "smoke"})


def test_every_section_and_plot(full_report):
    md, pngs = full_report
    positions = [md.index(s) for s in SECTIONS]
    assert positions == sorted(positions), "sections out of order"
    assert set(pngs) == set(report.PNG_NAMES.values())
    for name, data in pngs.items():
        assert f"]({name})" in md, f"{name} is not referenced by the markdown"
        assert_png(data)


def test_results_table_numbers_match_the_input(full_report):
    md, _ = full_report
    rows = make_rows()
    for strategy, nbytes in STRATEGIES.items():
        group = [r for r in rows if r["strategy"] == strategy]
        top1 = np.array([r["top1"] for r in group])
        line = table_row(md, "distilled", "resnet18", strategy, "-")
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[4] == f"{100 * top1.mean():.2f} ± {100 * top1.std():.2f}"
        assert cells[5] == "3"
        assert cells[6] == str(max(r["steps"] for r in group))     # the student's optimiser steps
        assert cells[7] == f"{nbytes:,}"
        step_ms = 1000 * np.mean([r["step_s"] for r in group])
        assert cells[9] == f"{step_ms:.1f}"
        assert cells[10] == f"{np.mean([r['wall_s'] for r in group]):.1f}"


def test_fidelity_sweep_and_storage_tables(full_report):
    md, _ = full_report
    assert table_row(md, "before", "21.00", "1.7340", "12.00", "83.00")
    assert table_row(md, "after", "77.00", "0.2451", "64.00", "83.00")
    best = max(SWEEP, key=lambda r: r["top1"])
    assert f"Best: conv rank {best['conv_rank']}, head rank {best['head_rank']}, window {best['window']}" in md
    for r in SWEEP:
        assert table_row(md, str(r["conv_rank"]), str(r["head_rank"]), r["window"], f"{100 * r['top1']:.2f}",
                         f"{r['lrs']:.3f}")
    assert table_row(md, "stored_soft_labels_bytes", "12,582,912", "12.00 MiB")
    assert table_row(md, "teacher_params", "11,181,642", "11.182 M")
    assert table_row(md, "clip_model", "hello-tiny-rn")
    # The teacher window of fidelity.json is named under the teacher curve.
    assert "window 2-10" in md


def test_optional_sections_are_left_out():
    md, pngs = report.build_report(make_rows()[:3])
    assert "## Results" in md and "### Accuracy vs label bytes" in md
    for s in SECTIONS[2:]:
        assert s not in md
    assert list(pngs) == [report.PNG_NAMES["accuracy"]]


def test_dataframe_input_gives_the_same_report():
    rows = make_rows()
    assert report.build_report(pd.DataFrame(rows))[0] == report.build_report(rows)[0]


def test_summary_keeps_images_continual_steps_and_students_apart():
    rows = evaluate_rows(num_classes=4, students="[resnet18,mobilenet_v2]", strategies="[hard]", seeds="[0,1,2]",
                         floor="true", continual_steps="[2]", continual_strategies="[hard]")
    for r in rows:
        if r["images"] == "floor" and r["student"] == "resnet18":
            r["top1"] = 0.1
        if r["student"] == "mobilenet_v2":
            del r["step_s"]                             # a measure no row of the group has
    summary = {tuple(s[k] for k in ("images", "student", "strategy", "continual_steps", "continual_step")): s
               for s in summarise(rows)}
    assert set(summary) == {("distilled", "resnet18", "hard", 0, 0), ("floor", "resnet18", "hard", 0, 0),
                            ("distilled", "mobilenet_v2", "hard", 0, 0), ("floor", "mobilenet_v2", "hard", 0, 0),
                            ("distilled", "resnet18", "hard", 2, 1), ("distilled", "resnet18", "hard", 2, 2)}
    assert summary[("floor", "resnet18", "hard", 0, 0)]["top1_mean"] == pytest.approx(0.1)
    assert all(s["seeds"] == 3 for s in summary.values())
    assert summary[("distilled", "mobilenet_v2", "hard", 0, 0)]["step_s"] is None
    assert summary[("distilled", "resnet18", "hard", 0, 0)]["step_s"] is not None
    # The report names each group apart, in the table and in the plot's legend.
    md, _ = report.build_report(rows)
    assert table_row(md, "floor", "resnet18", "hard", "-")
    assert table_row(md, "distilled", "resnet18", "hard", "1/2")
    assert report.series_label(summary[("distilled", "resnet18", "hard", 2, 1)], True) == \
        "hard (continual 1/2, resnet18)"
    assert report.series_label(summary[("floor", "resnet18", "hard", 0, 0)], False) == "hard (floor images)"


def test_stopped_sweep_trials_are_listed_not_plotted():
    sweep = SWEEP[:3] + [{**SWEEP[3], "top1": None, "stopped_early": True}]
    ranks, windows, grid = report.sweep_grid(report.sweep_summary(sweep))
    assert ranks == [2, 4] and windows == ["1-2", "2-3"]
    assert np.isnan(grid[1, 1]) and grid[0, 0] == pytest.approx(SWEEP[0]["top1"])
    md, pngs = report.build_report(make_rows()[:3], sweep_rows=sweep)
    assert table_row(md, "4", "64", "2-3", "stopped early")
    assert_png(pngs[report.PNG_NAMES["sweep"]])


@pytest.mark.parametrize("bad, match", [
    ({"top1": None}, r"row 1 lacks \['top1'\]"),
    ({"top1": 45.2}, r"row 1 has top1=45.2; expected a fraction"),
    ({"label_bytes": None}, r"row 1 lacks \['label_bytes'\]"),
])
def test_bad_results_rows_name_the_row_and_key(bad, match):
    rows = make_rows()[:2]
    rows[1] = {**rows[1], **bad}
    with pytest.raises(ValueError, match=match):
        report.build_report(rows)


def test_bad_fidelity_and_sweep_name_the_key():
    with pytest.raises(ValueError, match=r"fidelity\['after'\] lacks \['kl'\]"):
        report.build_report(make_rows()[:3], fidelity={"after": {"agreement": 0.5, "top1": 0.4}})
    with pytest.raises(ValueError, match=r"sweep_rows row 0 lacks \['window'\]"):
        report.build_report(make_rows()[:3], sweep_rows=[{"conv_rank": 4, "head_rank": 64, "top1": 0.3}])


def test_format_table_for_the_terminal():
    text = format_table(make_rows())
    lines = text.splitlines()
    assert len(lines) == 2 + len(STRATEGIES)
    assert re.fullmatch(r"[- ]+", lines[1])
    # Columns line up: every cell of a column starts at the header's offset.
    col = lines[0].index("label bytes")
    for line, (strategy, nbytes) in zip(lines[2:], STRATEGIES.items()):
        assert line.split()[:4] == ["distilled", "resnet18", strategy, "-"]
        assert line[col:].startswith(f"{nbytes:,}")
    # The summary table that write_results stores (and a manifest holds) prints the same.
    assert format_table(summarise(make_rows())) == text
    generic = format_table([{"a": 1, "b": 0.123456}, {"a": 22, "b": None}])
    assert generic.splitlines()[2:] == ["1   0.1235", "22  -"]


def test_report_key_is_a_flat_store_key():
    assert report.report_key("reports/demo-1a2b3c") == "reports-demo-1a2b3c"
    assert report.report_key("my run") == "my-run"
    with pytest.raises(ValueError):
        report.report_key("///")


@pytest.fixture(params=["file", "s3"])
def store(request):
    uri = request.getfixturevalue("file_store_uri" if request.param == "file" else "s3_bucket")
    return open_store(uri)


def test_write_report_through_the_store(store, full_report):
    uri = report.write_report(store, "reports/smoke-abc123", make_rows(), TRAJECTORY, FIDELITY, SWEEP, STORAGE,
                              inputs={"evaluate": "evaluate-0123456789ab"}, meta={"preset": "smoke"})
    key = "reports-smoke-abc123"
    assert uri == store.uri_for(key, report.REPORT_FILE)
    assert store.exists(key), "the report artifact has no manifest"
    assert set(store.list_files(key)) == {report.REPORT_FILE, *report.PNG_NAMES.values()}
    manifest = store.manifest(key)
    assert manifest["stage"] == "report" and manifest["inputs"] == {"evaluate": "evaluate-0123456789ab"}
    md = store.get_bytes(key, report.REPORT_FILE).decode()
    for s in SECTIONS:
        assert s in md
    # The stored plots are the built ones, byte for byte (rendering is deterministic), and decode.
    _, built = full_report
    for name, data in built.items():
        stored = store.get_bytes(key, name)
        assert stored == data
        assert_png(stored)
    if store.uri.startswith("s3://"):
        import boto3

        bucket = store.uri[5:].split("/", 1)[0]
        listed = boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]
        assert any(o["Key"].endswith(f"{key}/{report.REPORT_FILE}") for o in listed)
    else:
        assert uri.startswith("file://") and uri.endswith(f"{key}/README.md")


def test_collect_inputs_reads_the_stage_artifacts(file_store_uri):
    """The stages' own writers (formats/) in, the report's readers out."""
    store = open_store(file_store_uri)
    writers = {"teachers-000000000001": lambda k: write_trajectory(store, k, TRAJECTORY),
               "transfer-000000000002": lambda k: write_fidelity(store, k, FIDELITY),
               "evaluate-000000000003": lambda k: write_results(store, k, make_rows(), wall_s=1.0)}
    for key, write in writers.items():
        write(key)
        store.finalize(key, key.split("-")[0], {}, {})
    got = report.collect_inputs(store, {"teachers": "teachers-000000000001", "transfer": "transfer-000000000002",
                                        "evaluate": "evaluate-000000000003", "select": "select-000000000004"})
    assert got["rows"] == make_rows() and got["trajectory"] == TRAJECTORY and got["fidelity"] == FIDELITY
    assert got["class_names"] == TRAJECTORY["class_names"]
    md, pngs = report.build_report(got["rows"], got["trajectory"], got["fidelity"])
    assert "## Projector fidelity" in md and len(pngs) == 3
    assert report.collect_inputs(store, {})["rows"] == []


def test_rows_are_labelled_with_their_image_source(file_store_uri):
    """An LPLD image set's rows say "lpld" in the report (RDED's say "rded"), so two sources' rows
    set side by side stay apart; floor rows keep "floor"."""
    from hello_ray.data.imageset import write_image_set

    store = open_store(file_store_uri)
    write_results(store, "evaluate-000000000005", make_rows(), wall_s=1.0)
    store.finalize("evaluate-000000000005", "evaluate", {}, {})
    images = np.zeros((2, 8, 8, 3), np.uint8)
    for key, meta in (("recover-000000000006", {"image_source": "lpld"}), ("select-000000000007", {})):
        write_image_set(store, key, images, [0, 1], ["a", "b"], None, meta)   # select: written before the key
    lpld = report.collect_inputs(store, {"evaluate": "evaluate-000000000005", "images": "recover-000000000006"})
    rded = report.collect_inputs(store, {"evaluate": "evaluate-000000000005", "images": "select-000000000007"})
    assert {r["images"] for r in lpld["rows"]} == {"lpld"} and {r["images"] for r in rded["rows"]} == {"rded"}
    md, _ = report.build_report(lpld["rows"] + rded["rows"])
    assert table_row(md, "lpld", "resnet18", "stored/10", "-") and table_row(md, "rded", "resnet18", "stored/10", "-")
    assert report.label_image_source([{"images": "floor"}], "lpld") == [{"images": "floor"}]


# ---------------------------------------------------------------- the distilled images' grid

GRID_NAMES = ["zero", "one", "two/deux"]   # a '/' in a class name is only ever text here


def grid_sets(store) -> np.ndarray:
    """A selected set (3 classes x 4 images of 8 px, classes interleaved) and its refined child
    (other pixels, same labels), written by the stages' own writer. Returns the selected pixels."""
    from hello_ray.data.imageset import write_image_set

    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    labels = [0, 1, 2] * 4
    # select records the teachers as its parent; only refine's parent is an image set
    write_image_set(store, "select-000000000011", images, labels, GRID_NAMES, None,
                    {"image_source": "lpld", "parent": "teachers-000000000010"})
    write_image_set(store, "refine-000000000012", 255 - images, labels, GRID_NAMES, None,
                    {"image_source": "lpld", "parent": "select-000000000011", "refine": {"steps": 3}})
    return images


def grid_cells(png: bytes) -> tuple[dict, list[list[list[np.ndarray]]]]:
    """The layout a grid PNG records, and its cells' pixels [panel][row][col], cut from the PNG."""
    from hello_ray.plots.image_grid import grid_layout

    lay = grid_layout(png)
    px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    (x0, y0), (ch, cw), (sy, sx) = lay["origin"], lay["cell"], lay["step"]
    cells = [[[px[y0 + r * sy:y0 + r * sy + ch, x0 + p * lay["panel_step"] + j * sx:][:, :cw]
               for j in range(len(row["images"]))] for r, row in enumerate(lay["rows"])]
             for p in range(len(lay["panels"]))]
    return lay, cells


def upscaled(img: np.ndarray, f: int) -> np.ndarray:
    return np.repeat(np.repeat(img, f, 0), f, 1)


def test_report_shows_the_distilled_images_and_before_after_refine(file_store_uri):
    """The report of a refined set holds the grid (rows = classes by name, columns = their images,
    each cell the set's exact pixels) and the before / after figure (parent left, refined right)."""
    store = open_store(file_store_uri)
    images = grid_sets(store)
    grid = report.collect_inputs(store, {"images": "refine-000000000012"})["images"]
    report.write_report(store, "grid-run", [], images=grid, inputs={"images": "refine-000000000012"})
    key = report.report_key("grid-run")
    assert set(store.list_files(key)) == {report.REPORT_FILE, *report.GRID_PNGS.values()}
    md = store.get_bytes(key, report.REPORT_FILE).decode()
    assert f"![distilled images per class]({report.GRID_PNGS['images']})" in md
    assert f"![before and after refine]({report.GRID_PNGS['before_after']})" in md
    caption = next(line for line in md.splitlines() if line.startswith("Distilled images (source: lpld"))
    assert "`refine-000000000012`, 12 images of 3 classes" in caption and "0 zero, 1 one, 2 two/deux" in caption

    png = store.get_bytes(key, report.GRID_PNGS["images"])
    lay, cells = grid_cells(png)
    assert [r["name"] for r in lay["rows"]] == GRID_NAMES and lay["cols"] == 4
    assert [r["images"] for r in lay["rows"]] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    f = lay["upscale"]
    assert f >= 2 and lay["cell"] == [8 * f, 8 * f]
    w, h = Image.open(io.BytesIO(png)).size
    assert w >= lay["origin"][0] + 4 * lay["step"][1] - 2 and h >= lay["origin"][1] + 3 * lay["step"][0] - 2
    for r, row in enumerate(lay["rows"]):
        for j, i in enumerate(row["images"]):
            np.testing.assert_array_equal(cells[0][r][j], upscaled(255 - images[i], f))

    lay, cells = grid_cells(store.get_bytes(key, report.GRID_PNGS["before_after"]))
    assert [p["key"] for p in lay["panels"]] == ["select-000000000011", "refine-000000000012"]
    assert lay["cols"] == 4 and len(lay["rows"]) == 3
    for r, row in enumerate(lay["rows"]):
        for j, i in enumerate(row["images"]):
            np.testing.assert_array_equal(cells[0][r][j], upscaled(images[i], f))        # before
            np.testing.assert_array_equal(cells[1][r][j], upscaled(255 - images[i], f))  # after


def test_an_unrefined_set_has_no_before_after(file_store_uri):
    """A selection's "parent" is the teachers, not an image set: the grid alone, nothing else read."""
    store = open_store(file_store_uri)
    grid_sets(store)
    grid = report.collect_inputs(store, {"images": "select-000000000011"})["images"]
    assert grid.parent is None and grid.source == "lpld"
    md, pngs = report.build_report([], images=grid)
    assert set(pngs) == {report.GRID_PNGS["images"]} and "Before / after" not in md


@pytest.mark.parametrize("labels, max_classes, per_class, rows", [
    ([0, 1, 2] * 4, 16, 2, [(0, [0, 3]), (1, [1, 4]), (2, [2, 5])]),
    ([2, 2, 0, 2], 16, 10, [(0, [2]), (2, [0, 1, 3])]),            # class 1 has no image: no row
    (list(range(1000)), 4, 10, [(0, [0]), (333, [333]), (666, [666]), (999, [999])]),
    (list(range(100)) * 2, 16, 10, None),                            # 16 distinct classes, spanning 0..99
])
def test_pick_classes_and_images(labels, max_classes, per_class, rows):
    """Classes picked deterministically, evenly over the label range; a row's first images in set order."""
    from hello_ray.plots.image_grid import pick_classes, pick_images

    classes = pick_classes(labels, max_classes)
    got = [(c, pick_images(labels, c, per_class)) for c in classes]
    if rows is not None:
        assert got == rows
    else:
        assert len(set(classes)) == 16 and classes[0] == 0 and classes[-1] == 99 and classes == sorted(classes)
        assert all(idx == [c, c + 100] for c, idx in got)
    assert pick_classes(labels, max_classes) == classes


def test_grid_of_many_large_images_shows_16_classes_in_96px_cells(file_store_uri):
    """224 px images become 96 px cells (a 20-class set shows 16 rows); the PNG size follows."""
    from hello_ray.data.imageset import write_image_set
    from hello_ray.plots.image_grid import MAX_CELL, read_image_grid, render_grid

    store = open_store(file_store_uri)
    names = [f"class number {c} with a rather long readable name" for c in range(20)]
    write_image_set(store, "select-000000000021", np.full((20, 224, 224, 3), 200, np.uint8), list(range(20)),
                    names, None, {"image_source": "rded"})
    grid = read_image_grid(store, "select-000000000021")
    assert len(grid.rows) == 16 and grid.rows[-1].name == names[19]
    png = render_grid(grid)
    lay, cells = grid_cells(png)
    assert lay["cell"] == [MAX_CELL, MAX_CELL] and lay["upscale"] == 0 and lay["cols"] == 1
    assert Image.open(io.BytesIO(png)).size[1] == lay["origin"][1] + 16 * lay["step"][0] - 2 + 6
    assert all(abs(int(c[0][0].astype(int).mean()) - 200) <= 1 for c in cells[0])

def test_data_section_shows_fingerprints_and_undecodable_images_per_class(file_store_uri):
    """The stages' manifest summaries (corrupt counts, split fingerprints) -> one Data table."""
    store = open_store(file_store_uri)
    fp = {"train": {"format": "imagefolder", "files": 9, "bytes": 2048, "sha256": "0123456789abcdef"}}
    corrupt = {"train": {"split": "train", "images": 9, "corrupt": 2, "per_class": {"dog": 1, "emu": 1},
                         "examples": ["/d/train/dog/1.png (truncated)"]}}
    for key, summary in {"teachers-000000000001": {"corrupt": corrupt, "dataset": fp},
                         "select-000000000002": {"corrupt": corrupt, "dataset": fp}}.items():
        write_trajectory(store, key, TRAJECTORY)  # what the report reads of a teachers artifact
        store.finalize(key, key.split("-")[0], {}, {}, summary)
    data = report.collect_inputs(store, {"teachers": "teachers-000000000001", "select": "select-000000000002"})["data"]
    assert set(data) == {"teachers", "select"} and data["teachers"]["corrupt"] == corrupt
    md, _ = report.build_report(make_rows(), data=data)
    section = md[md.index("## Data"):]
    assert "train: 9 imagefolder file(s), 2.00 KiB, `0123456789abcdef`" in section
    assert "| teachers | train (train) | 9 | 2 | dog: 1, emu: 1 |" in section
    assert "| select | train (train) | 9 | 2 | dog: 1, emu: 1 |" in section
    assert "## Data" not in report.build_report(make_rows())[0]
