import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tunelab.core import synthesis
from tunelab.core.datasets import load_image_dataset
from tunelab.core.errors import Interrupted, TuneLabError

SMALL = dict(steps=2, width=64, height=64)
SEED_KEYWORDS = ["low quality", "bad hands", "random text", "error", "missing or extra fingers", "cropped",
                 "jpeg artifacts", "signature", "watermark", "blurry", "ugly", "duplicate", "mutilated"]


def small_plan(**kw):
    return synthesis.build_plan(["a", "b", "c"], guidance=[8, 9], seed=7, **kw)


def listing(folder: Path) -> dict:
    """Every file under `folder` (hidden ones too) -> bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_complete(folder: Path, count: int, text: str = "wrong") -> list:
    """Every planned image exactly once, complete; metadata.jsonl one valid line per image, sorted; no temps."""
    names = [f"{i:05d}.png" for i in range(count)]
    visible = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert visible == sorted(names + ["metadata.jsonl", "plan.json"])
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    for n in names:
        with Image.open(folder / n) as im:
            im.load()
            assert im.size == (64, 64)
    lines = read_jsonl(folder / "metadata.jsonl")
    assert [line["file_name"] for line in lines] == names
    assert [line["index"] for line in lines] == list(range(count))
    assert all(line["text"] == text and line["negative"] == "" for line in lines)
    return lines


@pytest.fixture(scope="module")
def dataset(tiny_sdxl, tmp_path_factory):
    """The small plan (6 images) made unsharded in one run."""
    folder = tmp_path_factory.mktemp("synth") / "full"
    report = synthesis.run(folder, tiny_sdxl, small_plan(), **SMALL)
    assert report.generated == list(range(6)) and report.merged and report.complete
    return folder


# --------------------------------------------------------------------------------------------------------------
# the plan


def test_default_plan_is_the_seeds_loop():
    plan = synthesis.build_plan()
    assert len(plan) == 78
    expected = []
    for keyword in SEED_KEYWORDS:  # the notebook's loop, written out independently
        prompt = ", ".join(SEED_KEYWORDS).replace(keyword, f"({keyword})++++")
        for cfg in [8, 9, 10, 11, 12, 13]:
            expected.append((prompt, keyword, float(cfg)))
    assert [(e.prompt, e.keyword, e.guidance) for e in plan.entries] == expected
    assert plan.entries[6].prompt == ("low quality, (bad hands)++++, random text, error, missing or extra fingers, "
                                      "cropped, jpeg artifacts, signature, watermark, blurry, ugly, duplicate, "
                                      "mutilated")
    assert [e.guidance for e in plan.entries[:6]] == [8.0, 9.0, 10.0, 11.0, 12.0, 13.0]
    assert [e.index for e in plan.entries] == list(range(78))
    # each image has its own seed, derived from base seed + index only: any image can be regenerated alone
    seeds = [e.seed for e in plan.entries]
    assert len(set(seeds)) == 78 and seeds == [synthesis.image_seed(0, i) for i in range(78)]
    assert seeds == [e.seed for e in synthesis.build_plan().entries]
    assert seeds != [e.seed for e in synthesis.build_plan(seed=1).entries]


def test_templates_subjects_and_the_replace_quirk():
    # str.replace on the joined text, exactly as the seed: "hand" is boosted inside "bad hands" too
    plan = synthesis.build_plan(["hand", "bad hands"], guidance="8")
    assert plan.entries[0].prompt == "(hand)++++, bad (hand)++++s"
    assert plan.entries[1].prompt == "hand, (bad hands)++++"
    plan = synthesis.build_plan("x\ny", template="a photo of {subject}, {keyword}", subjects="cat\n\ndog ",
                                guidance="8, 9", per_entry=2, boost="1.5", seed=3)
    assert len(plan) == 2 * 2 * 2 * 2
    assert [(e.keyword, e.subject, e.guidance, e.repeat) for e in plan.entries[:5]] == [
        ("x", "cat", 8.0, 0), ("x", "cat", 8.0, 1), ("x", "cat", 9.0, 0), ("x", "cat", 9.0, 1), ("x", "dog", 8.0, 0)]
    assert plan.entries[0].prompt == "a photo of cat, (x)1.5"
    # placeholders are filled in one pass: a subject that looks like a placeholder stays text
    plan = synthesis.build_plan(["x"], template="{subject} {keyword}", subjects=["{keyword}"], guidance=[8])
    assert plan.entries[0].prompt == "{keyword} (x)++++"


@pytest.mark.parametrize("kwargs, input_name", [
    (dict(keywords=[]), "keywords"),
    (dict(keywords="\n \n"), "keywords"),
    (dict(template="a photo of a cat"), "template"),
    (dict(template="{keyword} {colour}"), "template"),
    (dict(template="{subject}, {keyword}"), "subjects"),
    (dict(subjects=["cat"]), "subjects"),
    (dict(guidance=""), "guidance"),
    (dict(guidance="8,x"), "guidance"),
    (dict(boost="+x"), "boost"),
    (dict(keywords=["a", "a"]), "keywords"),
    (dict(keywords=["bad (hands"]), "keywords"),
    (dict(per_entry=0), "per_entry"),
])
def test_bad_plans_are_refused(kwargs, input_name):
    with pytest.raises(TuneLabError) as e:
        synthesis.build_plan(**kwargs)
    assert e.value.input_name == input_name


# --------------------------------------------------------------------------------------------------------------
# writing, resuming, sharding


def test_dataset_layout(dataset):
    lines = check_complete(dataset, 6)
    plan = small_plan()
    assert [(line["prompt"], line["keyword"], line["guidance"], line["seed"]) for line in lines] == [
        (e.prompt, e.keyword, e.guidance, e.seed) for e in plan.entries]
    doc = json.loads((dataset / "plan.json").read_text())
    assert doc["count"] == 6 and len(doc["fingerprint"]) == 64 and doc["settings"]["model"]["model"] == "tiny-sdxl"
    assert doc["settings"]["steps"] == 2 and doc["settings"]["width"] == 64
    # the generation settings travel inside each PNG too
    with Image.open(dataset / "00003.png") as im:
        assert json.loads(im.text["tunelab"]) == lines[3]


def test_one_image_regenerates_alone(dataset, tiny_sdxl):
    from tunelab.core import images
    from tunelab.core.prompt import encode
    from tunelab.core.sampling import generate

    e = small_plan().entries[4]
    image = generate(tiny_sdxl, encode(tiny_sdxl, e.prompt), seed=e.seed, guidance=e.guidance, **SMALL)
    with Image.open(dataset / e.file_name) as im:
        assert list(im.convert("RGB").getdata()) == list(images.tensor_to_pil(image)[0].getdata())


def test_shards_equal_one_run(dataset, tiny_sdxl, tmp_path):
    from tunelab.cli import main

    out = tmp_path / "sharded"
    first = synthesis.run(out, tiny_sdxl, small_plan(), shard="1/2", **SMALL)
    assert first.generated == [1, 3, 5] and not first.merged and first.missing == [0, 2, 4]
    assert not (out / "metadata.jsonl").exists()  # not a dataset until every shard is done
    assert main(["synth", "--out", str(out), "--merge"]) == 2  # incomplete: refused, nothing written
    assert not (out / "metadata.jsonl").exists()
    second = synthesis.run(out, tiny_sdxl, small_plan(), shard="0/2", **SMALL)
    assert second.generated == [0, 2, 4] and second.merged  # the last shard to finish merges
    full, parts = listing(dataset), listing(out)
    for name in [f"{i:05d}.png" for i in range(6)] + ["metadata.jsonl", "plan.json"]:
        assert parts[name] == full[name], name  # same bytes, file for file
    assert main(["synth", "--out", str(out), "--merge"]) == 0
    assert listing(out)["metadata.jsonl"] == full["metadata.jsonl"]


def test_changed_plan_is_refused(dataset, tiny_sdxl):
    before = listing(dataset)
    for plan, kw in [(synthesis.build_plan(["a", "b", "c"], guidance=[8, 10], seed=7), SMALL),
                     (small_plan(), dict(SMALL, steps=3)),
                     (small_plan(), dict(SMALL, instance_prompt="bad"))]:
        with pytest.raises(TuneLabError, match="different plan"):
            synthesis.run(dataset, tiny_sdxl, plan, **kw)
    assert listing(dataset) == before


def test_foreign_folder_is_refused(tiny_sdxl, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(TuneLabError, match="not a TuneLab dataset"):
        synthesis.run(tmp_path / "photos", tiny_sdxl, small_plan(), **SMALL)
    assert os.listdir(tmp_path / "photos") == ["holiday.jpg"]


def test_resume_repairs_a_damaged_folder(dataset, tiny_sdxl, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(dataset, out)
    meta = out / "metadata.jsonl"
    lines = meta.read_text().splitlines(keepends=True)
    # line of 00001 lost, 00002 duplicated, PNG 00004 gone, a truncated last line, a killed writer's temp file
    meta.write_text(lines[0] + "".join(lines[2:]) + lines[2] + lines[5][:30])
    (out / "00004.png").unlink()
    (out / ".00004.png.k1ll3d.tmp").write_bytes(b"\x89PNG half")
    report = synthesis.run(out, tiny_sdxl, small_plan(), **SMALL)
    assert report.generated == [4] and report.repaired_lines == [1] and report.merged
    assert [p.name for p in report.removed] == [".00004.png.k1ll3d.tmp"]
    check_complete(out, 6)
    assert listing(out) == listing(dataset)
    # a complete dataset reruns as a no-op and writes nothing
    mtime = (out / "metadata.jsonl").stat().st_mtime_ns
    again = synthesis.run(out, tiny_sdxl, small_plan(), **SMALL)
    assert again.generated == [] and again.skipped == list(range(6)) and again.merged
    assert (out / "metadata.jsonl").stat().st_mtime_ns == mtime
    assert listing(out) == listing(dataset)


def test_interrupt_leaves_whole_files(dataset, tiny_sdxl, tmp_path):
    from tunelab.core.progress import Progress

    out = tmp_path / "copy"
    shutil.copytree(dataset, out)
    for i in (1, 3, 5):
        (out / f"{i:05d}.png").unlink()
    finished, stepped, totals = [], [], []

    class StopAfterOne(Progress):
        def __init__(self, total, desc=""):
            super().__init__(total, desc)
            totals.append(total)

        def update(self, n=1, info=None):
            super().update(n, info)
            (finished if info else stepped).append(info or n)

        def interrupted(self):
            # the user presses stop during the first step of the second image
            return len(finished) == 1 and len(stepped) > 1

    with pytest.raises(Interrupted):
        synthesis.run(out, tiny_sdxl, small_plan(), progress=StopAfterOne, **SMALL)
    assert totals == [3 * 2] and finished == ["00001.png"] and stepped == [1, 1]  # 2 steps per image, 3 to make
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png", "00004.png"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert [line["index"] for line in read_jsonl(out / "metadata.jsonl")] == [0, 2, 4, 1]
    report = synthesis.run(out, tiny_sdxl, small_plan(), **SMALL)
    assert report.generated == [3, 5]
    assert listing(out) == listing(dataset)


def test_kill_and_rerun(tiny_sdxl, tmp_path):
    from tunelab.cli import main

    out = tmp_path / "killed"
    args = ["synth", "--out", str(out), "--keywords", "a", "b", "c", "--guidance", "8", "9", "--steps", "2",
            "--size", "64", "64"]
    env = dict(os.environ)  # TUNELAB_CACHE: the tiny models this session already built
    proc = subprocess.Popen([sys.executable, "-m", "tunelab"] + args, cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while len(list(out.glob("*.png"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the synth subprocess made no images"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert 2 <= len(list(out.glob("*.png"))) < 6  # killed part-way
    assert main(args) == 0
    check_complete(out, 6)
    assert len(json.loads((out / "plan.json").read_text())["entries"]) == 6


# --------------------------------------------------------------------------------------------------------------
# refusals: nothing written


def test_cli_refusals_write_nothing(tmp_path):
    from tunelab.cli import main

    out = tmp_path / "never"
    for extra in (["--keywords", " "], ["--template", "a photo of a cat"], ["--size", "63", "64"],
                  ["--guidance", "-1"], ["--shard", "2/2"]):
        assert main(["synth", "--out", str(out)] + extra) == 2, extra
        assert not out.exists(), extra


def test_node(tiny_sdxl, tmp_path, monkeypatch):
    from tunelab import NODE_CLASS_MAPPINGS
    from tunelab.nodes.synthesis import WrongImageSynthesis

    assert NODE_CLASS_MAPPINGS["TuneLabWrongImageSynthesis"] is WrongImageSynthesis
    spec = WrongImageSynthesis.INPUT_TYPES()
    for section in spec.values():
        for name, (_, opts) in section.items():
            assert opts.get("tooltip"), name
    assert spec["required"]["keywords"][1]["default"].splitlines() == SEED_KEYWORDS

    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setenv("TUNELAB_OUTPUT", str(out))
    node = WrongImageSynthesis()
    args = dict(pipe=tiny_sdxl, keywords="a\nb", boost="++++", template="{keywords}", subjects="", guidance="8",
                per_entry=1, seed=0, steps=2, width=64, height=64, instance_prompt="wrong", preview_cap=1)
    res = node.synthesize(dataset_name="runs/ds", **args)
    preview, path = res["result"]
    assert preview.shape == (1, 64, 64, 3) and Path(path) == (out / "runs" / "ds").resolve()
    check_complete(Path(path), 2)
    assert res["ui"]["images"] == [{"filename": "00000.png", "subfolder": "runs/ds", "type": "output"}]

    before = listing(out)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "link")
    for bad in ("../x", str(tmp_path / "abs"), "link/x", "a/../../x"):
        with pytest.raises(TuneLabError) as e:
            node.synthesize(dataset_name=bad, **args)
        assert e.value.input_name == "dataset_name"
    for bad, name in ((dict(keywords=""), "keywords"), (dict(template="no placeholder"), "template"),
                      (dict(width=100), "width"), (dict(guidance="8", steps=3), "dataset_name")):
        with pytest.raises(TuneLabError) as e:
            node.synthesize(dataset_name="runs/ds", **{**args, **bad})
        assert e.value.input_name == name
    (out / "link").unlink()
    assert listing(out) == before and not any((tmp_path / "elsewhere").iterdir())
    assert not (tmp_path / "abs").exists() and not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------------------
# the training input format


def test_dataset_loads_as_training_input(dataset):
    ds = load_image_dataset(dataset)
    assert len(ds) == 6 and [r.file_name for r in ds] == [f"{i:05d}.png" for i in range(6)]
    assert all(r.caption == "wrong" and r.image.mode == "RGB" and r.image.size == (64, 64) for r in ds)
    assert ds[2].meta["keyword"] == "b"


def test_image_dataset_loader(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    with pytest.raises(TuneLabError, match="no images"):
        load_image_dataset(folder, instance_prompt="wrong")
    (folder / "notes.txt").write_text("hi")
    with pytest.raises(TuneLabError, match="notes.txt"):
        load_image_dataset(folder, instance_prompt="wrong")
    with pytest.raises(TuneLabError, match="not found"):
        load_image_dataset(tmp_path / "missing")
    # no metadata: the instance prompt is the caption; RGBA becomes RGB; EXIF orientation is applied
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(folder / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    Image.new("RGB", (16, 8), "blue").save(folder / "b.jpg", exif=exif.tobytes())
    (folder / ".hidden.png").write_bytes(b"not an image")  # hidden files are skipped
    ds = load_image_dataset(folder, instance_prompt="wrong")
    assert [(r.file_name, r.caption, r.image.mode, r.image.size) for r in ds] == [
        ("a.png", "wrong", "RGB", (8, 8)), ("b.jpg", "wrong", "RGB", (8, 16))]
    with pytest.raises(TuneLabError) as e:
        load_image_dataset(folder)  # no captions and no instance prompt
    assert e.value.input_name == "instance_prompt"
    # metadata captions win; an image without a line falls back
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a red square"}) + "\n")
    ds = load_image_dataset(folder, instance_prompt="wrong", keep_images=False)
    assert [(r.caption, r.image) for r in ds] == [("a red square", None), ("wrong", None)]
    for bad_line, what in ((json.dumps({"file_name": "gone.png", "text": "x"}), "gone.png"),
                           (json.dumps({"file_name": "../a.png", "text": "x"}), "../a.png"),
                           ("{broken", "line 1")):
        (folder / "metadata.jsonl").write_text(bad_line + "\n")
        with pytest.raises(TuneLabError, match=what.replace(".", r"\.")):
            load_image_dataset(folder, instance_prompt="wrong")
    (folder / "metadata.jsonl").unlink()
    # corrupt and truncated images are named
    (folder / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(TuneLabError, match="c.png"):
        load_image_dataset(folder, instance_prompt="wrong")
    (folder / "c.png").unlink()
    data = (folder / "b.jpg").read_bytes()
    (folder / "b.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(TuneLabError, match="b.jpg"):
        load_image_dataset(folder, instance_prompt="wrong")
