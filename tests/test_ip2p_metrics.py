"""InstructPix2Pix learned metrics (CLIP / DINOv2 similarity, CLIP directional similarity) and the guidance sweep."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tunelab.core import instruct, instruct_data, metrics, scoring, tiny
from tunelab.core.errors import TuneLabError


def photo(w, h, seed=0):
    rng = np.random.RandomState(seed)
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3)
    return Image.fromarray(np.clip(base * rng.rand() + rng.rand(h, w, 3) * 80, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def clip():
    return scoring.load("tiny-clip", "clip", device="cpu")


@pytest.fixture(scope="module")
def dino():
    return scoring.load("tiny-dinov2", "dino", device="cpu")


def _clip_forward(images, texts):
    """transformers' CLIPModel forward: its normalised image_embeds / text_embeds."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = tiny.ensure_scorer("tiny-clip")
    model = CLIPModel.from_pretrained(str(folder)).eval()
    tok = CLIPTokenizer.from_pretrained(str(folder))
    proc = scoring._image_processor(folder, "t")
    with torch.no_grad():
        out = [model(**tok([t], return_tensors="pt"), pixel_values=proc(images=[im], return_tensors="pt")["pixel_values"])
               for im, t in zip(images, texts)]
    return [o.image_embeds[0].double() for o in out], [o.text_embeds[0].double() for o in out]


def test_learned_metrics_equal_independent_computations(clip, dino):
    from transformers import Dinov2Model

    a, b = photo(40, 32, 1), photo(40, 32, 2)
    (ea, eb), (ta, tb) = _clip_forward([a, b], ["a photo of a street", "a cartoon of a street"])
    cos = torch.nn.functional.cosine_similarity
    assert metrics.clip_image_similarity(clip, b, a) == pytest.approx(float(cos(ea, eb, dim=0)), abs=1e-6)
    direction = float(cos(eb - ea, tb - ta, dim=0))
    assert metrics.clip_directional_similarity(clip, a, b, "a photo of a street", "a cartoon of a street") == \
        pytest.approx(direction, abs=1e-6)
    model = Dinov2Model.from_pretrained(str(tiny.ensure_scorer("tiny-dinov2"))).eval()
    proc = scoring._image_processor(tiny.ensure_scorer("tiny-dinov2"), "t")
    with torch.no_grad():
        da, db = (model(pixel_values=proc(images=[x], return_tensors="pt")["pixel_values"]).pooler_output[0]
                  for x in (a, b))
    assert metrics.dino_similarity(dino, b, a) == pytest.approx(float(cos(da, db, dim=0)), abs=1e-6)
    assert metrics.clip_image_similarity(clip, a, a) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(TuneLabError):
        metrics.dino_similarity(clip, a, b)


@pytest.fixture
def captioned_dataset(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    photo(32, 32, seed=7).save(clean / "x.png")
    folder = instruct_data.synthesize(clean, tmp_path / "ds", degradations=["rain", "blur"], seed=0)["folder"]
    meta = folder / instruct_data.METADATA
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    rows[0].update(original_prompt="a rainy street", edited_prompt="a clear street")  # only the first has captions
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_evaluate_with_learned_metrics(tiny_ip2p, clip, dino, captioned_dataset, tmp_path):
    out = tmp_path / "eval"
    ev = instruct.evaluate([("base", tiny_ip2p)], captioned_dataset, steps=2, seed=0, clip=clip, dino=dino,
                           out_dir=out)
    pairs = {p.name: p for p in instruct_data.read(captioned_dataset)}
    with_captions = [r for r in ev.rows if "clip_directional" in r]
    assert len(ev.rows) == 2 and len(with_captions) == 1
    for r in ev.rows:
        saved = Image.open(out / r["image"]).convert("RGB")
        source, truth = pairs[r["example"]].images()
        assert r["clip_to_truth"] == pytest.approx(metrics.clip_image_similarity(clip, saved, truth), abs=1e-12)
        assert r["clip_to_input"] == pytest.approx(metrics.clip_image_similarity(clip, saved, source), abs=1e-12)
        assert r["dino_to_truth"] == pytest.approx(metrics.dino_similarity(dino, saved, truth), abs=1e-12)
        assert r["dino_to_input"] == pytest.approx(metrics.dino_similarity(dino, saved, source), abs=1e-12)
    r = with_captions[0]
    source = pairs[r["example"]].images()[0]
    expected = metrics.clip_directional_similarity(clip, source, Image.open(out / r["image"]), "a rainy street",
                                                   "a clear street")
    assert r["clip_directional"] == pytest.approx(expected, abs=1e-12)
    s = ev.summary["base"]["all"]
    assert s["n_directional"] == 1 and s["clip_directional"] == pytest.approx(r["clip_directional"])
    assert s["dino_to_truth"] == pytest.approx(np.mean([x["dino_to_truth"] for x in ev.rows]))
    header = (out / "report.csv").read_text().splitlines()[0]
    assert header == ("model,example,task,instruction,psnr,ssim,clip_to_truth,clip_to_input,dino_to_truth,"
                      "dino_to_input,clip_directional,image")
    assert "DINOv2 sim. to truth" in ev.table and "CLIP directional" in ev.table
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["scorers"]["dino"]["model"] == "tiny-dinov2"
    with pytest.raises(TuneLabError) as e:
        instruct.evaluate([("base", tiny_ip2p)], captioned_dataset, steps=1, clip=dino)
    assert e.value.input_name == "clip_model"


def test_guidance_sweep_writes_its_plot(tiny_ip2p, clip, captioned_dataset, tmp_path):
    out = tmp_path / "sweep"
    sw = instruct.sweep([("base", tiny_ip2p)], captioned_dataset, image_guidances=[1.0, 1.5, 2.0],
                        guidances="5, 7", steps=1, seed=0, clip=clip, out_dir=out)
    assert len(sw.points) == 6 and set(sw.evaluations) == {(ig, g) for ig in (1.0, 1.5, 2.0) for g in (5.0, 7.0)}
    for (ig, g), ev in sw.evaluations.items():
        sub = out / instruct.settings_name(1, ig, g)
        assert (sub / "report.json").is_file()
        point = next(p for p in sw.points if p["image_guidance"] == ig and p["guidance"] == g)
        assert point["clip_to_truth"] == ev.summary["base"]["all"]["clip_to_truth"]
    with Image.open(out / "sweep.png") as im:
        assert im.size[0] >= 3 * 400 and im.size[1] >= 2 * 300  # psnr, ssim and 3 CLIP panels: two rows
    doc = json.loads((out / "sweep.json").read_text())
    assert len(doc["points"]) == 6 and doc["metrics"][:2] == ["psnr", "ssim"]
    assert len((out / "sweep.csv").read_text().splitlines()) == 7
    # a different image guidance changes the edit (the curve is not flat)
    assert len({round(p["clip_to_input"], 9) for p in sw.points}) > 1
    with pytest.raises(TuneLabError) as e:
        instruct.sweep([("base", tiny_ip2p)], captioned_dataset, image_guidances="1, x", guidances=[7], steps=1)
    assert e.value.input_name == "image_guidance_sweep"


def test_eval_ip2p_cli_sweep(captioned_dataset, tmp_path, capsys):
    from tunelab.cli import main

    out = tmp_path / "cli"
    rc = main(["eval-ip2p", "--dataset", str(captioned_dataset), "--steps", "1", "--clip-model", "tiny-clip",
               "--dino-model", "tiny-dinov2", "--sweep-image-guidance", "1", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    assert (out / "sweep.png").is_file() and len(json.loads((out / "sweep.json").read_text())["points"]) == 2
    assert main(["eval-ip2p", "--dataset", str(captioned_dataset), "--caption-columns", "onlyone",
                 "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_instruct_evaluate_node_learned_metrics_and_sweep(tiny_ip2p, captioned_dataset, tmp_path, monkeypatch):
    import shutil

    from tunelab.nodes.instruct import InstructEvaluate

    out = tmp_path / "output"
    out.mkdir()
    shutil.copytree(captioned_dataset, out / "ds")
    monkeypatch.setenv("TUNELAB_OUTPUT", str(out))
    res = InstructEvaluate().evaluate(tiny_ip2p, "base", "ds", 1, 1.5, 7.0, 0, 0, "ev", clip_model="tiny-clip",
                                      dino_model="tiny-dinov2", image_guidance_sweep="1, 2")
    grids, table, plot = res["result"]
    assert grids.shape[0] == 4 and "CLIP directional" in table and plot.shape[0] == 1
    assert len(list(out.glob("ev/*/sweep.png"))) == 1 and len(list(out.glob("ev/*/steps@*/report.json"))) == 2
