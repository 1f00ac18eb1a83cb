"""Validation splits of instruction datasets are made by source image, stratified by task: a ground truth the
model trains on is never scored as held out, and every task is evaluated."""
import json

import numpy as np
import pytest
from PIL import Image

from tunelab import cli
from tunelab.core import instruct_data
from tunelab.core.errors import TuneLabError


def picture(seed, size=(24, 16)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def rows_of(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def info_of(folder):
    return json.loads((folder / "dataset_info.json").read_text())


def assert_split_by(rows, key):
    """No value of `key` (a function of a row) in both splits."""
    train = {key(r) for r in rows if r["split"] == "train"}
    val = {key(r) for r in rows if r["split"] == "validation"}
    assert train and val
    assert not train & val, f"in both splits: {sorted(train & val)}"


def test_synth_splits_by_clean_image_and_every_task_is_validated(tmp_path, capsys):
    clean = tmp_path / "clean"
    clean.mkdir()
    for i in range(5):
        picture(i).save(clean / f"c{i}.png")
    out = tmp_path / "ds"
    rc = cli.main(["instruct-data", "synth", "--clean", str(clean), "--out", str(out), "--val-fraction", "0.25",
                   "--seed", "3"])
    assert rc == 0, capsys.readouterr()
    rows = rows_of(out)
    assert len(rows) == 20  # 5 clean images x 4 degradations: each source yields 4 examples
    assert_split_by(rows, lambda r: r["source"])
    # the clean image is the target: no ground-truth pixels are shared across the splits either
    edited = {s: {(out / r["edited_image" + instruct_data.FILE_NAME]).read_bytes() for r in rows if r["split"] == s}
              for s in ("train", "validation")}
    assert not edited["train"] & edited["validation"]
    val_tasks = {r["task"] for r in rows if r["split"] == "validation"}
    assert val_tasks == set(instruct_data.TASK_PROMPTS)
    n_val = sum(r["split"] == "validation" for r in rows)
    assert n_val >= 5 and n_val % 4 == 0  # at least the fraction, in whole sources
    split = info_of(out)["split"]
    assert split["rule"] == instruct_data.SPLIT_RULE and split["groups"] == 5
    assert split["sources"]["validation"] == sorted({r["source"] for r in rows if r["split"] == "validation"})
    assert split["sources"]["train"] == sorted({r["source"] for r in rows if r["split"] == "train"})
    assert split["tasks_not_in_validation"] == []
    assert all(v["validation"] >= 1 and v["train"] >= 1 for v in split["tasks"].values())
    assert {p.task for p in instruct_data.held_out(out)} == set(instruct_data.TASK_PROMPTS)
    # reproducible: same seed, same split; another seed may pick other sources but keeps the rules
    again = instruct_data.synthesize(clean, tmp_path / "again", seed=3, val_fraction=0.25)
    assert [r["split"] for r in rows_of(again["folder"])] == [r["split"] for r in rows]


def test_table_rows_sharing_an_input_or_a_ground_truth_stay_together(tmp_path):
    """A low-level table: several degraded inputs of one ground truth, and inputs edited by several
    instructions. Examples joined through either image form one source group."""
    root = tmp_path / "t"
    root.mkdir()
    rows = []
    tasks = ("derain the image", "deblur the blurry image", "Make it a cartoon")
    for g in range(6):
        gt = f"gt{g}.png"
        picture(100 + g).save(root / gt)
        for k, instruction in enumerate(tasks[:2]):
            name = f"in{g}_{k}.png"
            picture(10 * g + k).save(root / name)
            rows.append({"input_image": name, "edit_prompt": instruction, "edited_image": gt})
        cartoon = f"cartoon{g}.png"
        picture(200 + g).save(root / cartoon)  # shares the input of the derain row, not its ground truth
        rows.append({"input_image": f"in{g}_0.png", "edit_prompt": tasks[2], "edited_image": cartoon})
    table = root / "pairs.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = instruct_data.from_table(table, tmp_path / "ds", val_fraction=0.2, seed=1)
    out_rows = rows_of(result["folder"])
    assert len(out_rows) == 18
    assert_split_by(out_rows, lambda r: r["source"])
    by_row = list(zip(rows, out_rows))
    assert_split_by([{"split": o["split"], "gt": r["edited_image"]} for r, o in by_row], lambda r: r["gt"])
    assert_split_by([{"split": o["split"], "in": r["input_image"]} for r, o in by_row], lambda r: r["in"])
    assert {r["task"] for r in out_rows if r["split"] == "validation"} == {"derain", "deblur", tasks[2]}
    info = info_of(result["folder"])
    assert info["split"]["groups"] == 6
    assert info["splits"] == {"train": 18 - 3 * info["split"]["validation_groups"],
                              "validation": 3 * info["split"]["validation_groups"]}


def test_folders_split_by_source_with_stratified_tasks(tmp_path):
    a, b = tmp_path / "in", tmp_path / "out"
    a.mkdir()
    b.mkdir()
    for i in range(10):
        picture(i).save(a / f"p{i}.png")
        picture(50 + i).save(b / f"p{i}.png")
    result = instruct_data.from_folders(a, b, tmp_path / "ds", instructions="Make it a cartoon",
                                        val_fraction=0.3, seed=2)
    rows = rows_of(result["folder"])
    assert_split_by(rows, lambda r: r["source"])
    assert sum(r["split"] == "validation" for r in rows) == 3
    assert info_of(result["folder"])["split"]["groups"] == 10


def test_a_split_needs_two_sources(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    picture(0).save(clean / "only.png")
    with pytest.raises(TuneLabError, match="val_fraction.*two source images"):
        instruct_data.synthesize(clean, tmp_path / "ds", val_fraction=0.5)
    assert not (tmp_path / "ds").exists()


def test_groups_join_through_shared_images():
    ex = lambda key, *images: instruct_data._Example(key=key, name=key, load=None, instruction="x", task="t",
                                                     images=images)
    groups = instruct_data.source_groups([ex("1", "a", "g1"), ex("2", "b", "g2"), ex("3", "c", "g1"),
                                          ex("4", "b", "g3"), ex("5", "d", "g4")])
    assert [[e.key for e in g] for g in groups] == [["1", "3"], ["2", "4"], ["5"]]
