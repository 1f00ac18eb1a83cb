import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tunelab.core import instruct, instruct_data, metrics
from tunelab.core.errors import Interrupted, TuneLabError
from tunelab.core.images import pil_to_tensor
from tunelab.core.progress import Progress
from tunelab.core.prompt import encode

STEPS = 3



def photo(w=64, h=64, seed=0):
    """A smooth, seeded test picture (gradients plus a few blobs), so degradations and metrics mean something."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / max(w - 1, 1), y / max(h - 1, 1), 0.5 + 0.5 * np.sin((x + y) / 7.0 + seed)], -1)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, 10)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
    return Image.fromarray((img.clip(0, 1) * 255).round().astype(np.uint8))


def direct(handle, cond, image, seed, steps=STEPS, igs=1.5, gs=7.0):
    """A plain diffusers StableDiffusionInstructPix2PixPipeline call with the same inputs."""
    out = handle.pipe(prompt_embeds=cond.embeds, negative_prompt_embeds=cond.negative_embeds, image=image,
                      num_inference_steps=steps, image_guidance_scale=igs, guidance_scale=gs,
                      generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return out.permute(0, 2, 3, 1)


def by_hand(handle, cond, pixels, seed, gs, igs, guided, steps=STEPS):
    """The sampling loop written out: each branch its own UNet call, combined with the IP2P formula
    eps = eps_uncond + gs (eps_text - eps_image) + igs (eps_image - eps_uncond), or eps_text alone."""
    from diffusers.utils.torch_utils import randn_tensor

    pipe = handle.pipe
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        image = pipe.image_processor.preprocess(pixels.permute(0, 3, 1, 2))
        image_latents = pipe.vae.encode(image).latent_dist.mode()
        latents = randn_tensor(image_latents.shape, generator=gen, dtype=image_latents.dtype) * sched.init_noise_sigma

        def eps(x, img, emb, t):
            return pipe.unet(torch.cat([x, img], 1), t, encoder_hidden_states=emb).sample

        for t in sched.timesteps:
            x = sched.scale_model_input(latents, t)
            e = eps(x, image_latents, cond.embeds, t)
            if guided:
                e_image = eps(x, image_latents, cond.negative_embeds, t)
                e_uncond = eps(x, torch.zeros_like(image_latents), cond.negative_embeds, t)
                e = e_uncond + gs * (e - e_image) + igs * (e_image - e_uncond)
            latents = sched.step(e, t, latents, generator=gen).prev_sample
        out = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (out / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------------------------
# edit


def test_edit_equals_diffusers(tiny_ip2p):
    pil = photo()
    ours = instruct.edit(tiny_ip2p, pil_to_tensor([pil]), "cartoonize (the image)++", steps=STEPS, seed=7)
    assert ours.shape == (1, 64, 64, 3) and ours.dtype == torch.float32
    cond = encode(tiny_ip2p, "cartoonize (the image)++", "")
    assert torch.equal(ours, direct(tiny_ip2p, cond, pil, 7))  # the pipeline fed the PIL image itself
    assert not torch.equal(ours, direct(tiny_ip2p, cond, pil, 8))


def test_dual_guidance_follows_the_formula(tiny_ip2p):
    pixels = pil_to_tensor([photo(32, 32, seed=1)])
    cond = encode(tiny_ip2p, "make it rain", "blurry")

    def ours(gs, igs, negative="blurry"):
        return instruct.edit(tiny_ip2p, pixels, "make it rain", guidance=gs, image_guidance=igs, steps=STEPS,
                             seed=3, negative=negative)

    guided = ours(7.0, 1.5)
    assert torch.allclose(guided, by_hand(tiny_ip2p, cond, pixels, 3, 7.0, 1.5, guided=True), atol=2e-4)
    # gs = igs = 1: the formula reduces to eps_text; diffusers then skips the 3-way batch (guidance needs gs > 1)
    plain = ours(1.0, 1.0)
    assert torch.allclose(plain, by_hand(tiny_ip2p, cond, pixels, 3, 1.0, 1.0, guided=False), atol=2e-4)
    assert torch.allclose(plain, by_hand(tiny_ip2p, cond, pixels, 3, 1.0, 1.0, guided=True), atol=2e-4)
    # without guidance neither the image scale nor the negative prompt enters; igs < 1 also switches guidance off
    assert torch.equal(plain, ours(1.0, 3.0)) and torch.equal(plain, ours(1.0, 1.0, negative=""))
    assert torch.equal(plain, ours(7.0, 0.5))
    assert not torch.equal(plain, guided)


def test_odd_sizes_and_batches_keep_their_size(tiny_ip2p):
    pil = photo(61, 47, seed=2)
    one = instruct.edit(tiny_ip2p, pil_to_tensor([pil]), "derain the image", steps=2, seed=1)
    assert one.shape == (1, 47, 61, 3)
    # padding, not resizing: the same as editing the mirror-padded 64x48 image and cropping it
    padded = instruct.pad_to_multiple(pil_to_tensor([pil]).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert padded.shape == (1, 48, 64, 3) and torch.equal(padded[:, :47, :61], pil_to_tensor([pil]))
    full = instruct.edit(tiny_ip2p, padded, "derain the image", steps=2, seed=1)
    assert torch.equal(one, full[:, :47, :61])
    batch = pil_to_tensor([photo(40, 24, seed=3), photo(40, 24, seed=4)])
    out = instruct.edit(tiny_ip2p, batch, "derain the image", steps=2, seed=1)
    assert out.shape == (2, 24, 40, 3) and not torch.equal(out[0], out[1])
    assert instruct.edit(tiny_ip2p, pil_to_tensor([photo(5, 3)]), "x", steps=1, seed=0).shape == (1, 3, 5, 3)


def test_progress_and_interrupt(tiny_ip2p):
    ticks = []

    class Counting(Progress):
        def update(self, n=1, info=None):
            ticks.append(n)
            super().update(n, info)

    instruct.edit(tiny_ip2p, pil_to_tensor([photo(32, 32)]), "x", steps=4, seed=0, progress=Counting)
    assert sum(ticks) == 4

    class Stop(Progress):
        def interrupted(self):
            return self.value >= 2

    with pytest.raises(Interrupted):
        instruct.edit(tiny_ip2p, pil_to_tensor([photo(32, 32)]), "x", steps=5, seed=0, progress=Stop)


def test_edit_refusals(tiny_ip2p, tiny_sd15):
    img = pil_to_tensor([photo(32, 32)])
    with pytest.raises(TuneLabError, match="8 input channels.*4-channel") as e:
        instruct.edit(tiny_sd15, img, "cartoonize", seed=0, steps=1)
    assert e.value.input_name == "pipe"
    for empty in ("", "   \n"):
        with pytest.raises(TuneLabError, match="instruction is empty") as e:
            instruct.edit(tiny_ip2p, img, empty, seed=0, steps=1)
        assert e.value.input_name == "instruction"
    with pytest.raises(TuneLabError) as e:
        instruct.edit(tiny_ip2p, img, "(cartoonize", seed=0, steps=1)
    assert e.value.input_name == "instruction"
    for kw, name in ((dict(steps=0), "steps"), (dict(guidance=-1.0), "guidance"),
                     (dict(image_guidance=float("nan")), "image_guidance")):
        with pytest.raises(TuneLabError) as e:
            instruct.edit(tiny_ip2p, img, "x", seed=0, **{"steps": 1, **kw})
        assert e.value.input_name == name
    with pytest.raises(TuneLabError, match="IMAGE"):
        instruct.edit(tiny_ip2p, torch.zeros(1, 8, 8), "x", seed=0, steps=1)


# ---------------------------------------------------------------------------------------------------------------
# metrics


def test_metrics_known_cases():
    ref = np.asarray(photo(48, 40)).copy()
    ref = (ref.astype(np.int32) * 150 // 255 + 50).astype(np.uint8)  # 50..200: room for +-k without clipping
    assert metrics.psnr(ref, ref) == math.inf and metrics.ssim(ref, ref) == pytest.approx(1.0)
    assert metrics.psnr(Image.fromarray(ref), Image.fromarray(ref)) == math.inf
    k = 10
    shifted = (ref.astype(np.int32) + k).astype(np.uint8)  # constant offset: MSE = k^2
    assert metrics.psnr(shifted, ref) == pytest.approx(10 * math.log10(255 ** 2 / k ** 2), abs=1e-9)
    signs = np.random.default_rng(0).choice([-k, k], size=ref.shape)  # uniform +-k: MSE = k^2 as well
    noisy = (ref.astype(np.int32) + signs).astype(np.uint8)
    assert metrics.psnr(noisy, ref) == pytest.approx(20 * math.log10(255 / k), abs=1e-9)
    assert metrics.ssim(noisy, ref) < metrics.ssim(shifted, ref) <= 1.0
    # floats in 0..1 (ComfyUI IMAGE): data range 1
    t = torch.from_numpy(ref.astype(np.float32) / 255.0)
    assert metrics.psnr(t + 0.05, t) == pytest.approx(10 * math.log10(1 / 0.05 ** 2), abs=1e-4)
    assert metrics.psnr(t[None], t[None]) == math.inf
    assert metrics.ssim(np.zeros((5, 5, 3), np.uint8), np.zeros((5, 5, 3), np.uint8)) == pytest.approx(1.0)
    with pytest.raises(TuneLabError, match="differ in size"):
        metrics.psnr(ref, ref[:-1])
    with pytest.raises(TuneLabError, match="floats"):
        metrics.psnr(t, ref)
    assert metrics.fmt(math.inf) == "inf" and metrics.json_value(math.inf) == "inf"
    assert metrics.mean([1.0, 3.0]) == 2.0 and metrics.mean([1.0, math.inf]) == math.inf


# ---------------------------------------------------------------------------------------------------------------
# instruction datasets


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rows_of(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture
def pairs_dirs(tmp_path):
    a, b = tmp_path / "inputs", tmp_path / "targets"
    a.mkdir()
    b.mkdir()
    for i in range(12):
        photo(36, 28, seed=i).save(a / f"img{i:02d}.png")
        photo(36, 28, seed=100 + i).save(b / f"img{i:02d}.jpg" if i == 3 else b / f"img{i:02d}.png")
    (a / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    return a, b


def test_folder_pairs_are_reproducible_and_spread_synonyms(pairs_dirs, tmp_path):
    a, b = pairs_dirs
    r1 = instruct_data.from_folders(a, b, tmp_path / "d1", seed=5)
    instruct_data.from_folders(a, b, tmp_path / "d2", seed=5)
    assert r1["examples"] == 12 and files_of(tmp_path / "d1") == files_of(tmp_path / "d2")
    rows = rows_of(tmp_path / "d1")
    assert set(rows[0]) >= {"input_image_file_name", "edit_prompt", "edited_image_file_name", "task", "source", "target_source"}
    assert all(r["edit_prompt"] in instruct_data.CARTOON_INSTRUCTIONS and r["task"] == "cartoonize" for r in rows)
    assert len({r["edit_prompt"] for r in rows}) >= 6, "synonyms are chosen per example, not one for all"
    assert rows[3]["target_source"] == "img03.jpg"
    # pairs keep their pixels (no resolution: 36x28 is center-cropped to 32x24, identically for both)
    src = np.asarray(Image.open(a / "img00.png"))[2:26, 2:34]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d1" / rows[0]["input_image_file_name"])), src)
    assert Image.open(tmp_path / "d1" / rows[0]["edited_image_file_name"]).size == (32, 24)
    other = instruct_data.from_folders(a, b, tmp_path / "d3", seed=6)
    assert [r["edit_prompt"] for r in rows_of(other["folder"])] != [r["edit_prompt"] for r in rows]
    one = instruct_data.from_folders(a, b, tmp_path / "d4", instructions="Make it a cartoon", limit=2,
                                     resolution=16, val_fraction=0.5)
    rows4 = rows_of(one["folder"])
    assert [r["edit_prompt"] for r in rows4] == ["Make it a cartoon"] * 2
    assert sorted(r["split"] for r in rows4) == ["train", "validation"]
    assert Image.open(one["folder"] / rows4[0]["input_image_file_name"]).size == (16, 16)  # 36x28 -> 21x16 -> 16x16
    assert len(instruct_data.held_out(one["folder"])) == 1


def test_synthesized_low_level_pairs(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    for i in range(2):
        photo(40, 32, seed=i).save(clean / f"c{i}.png")
    r1 = instruct_data.synthesize(clean, tmp_path / "s1", seed=9)
    instruct_data.synthesize(clean, tmp_path / "s2", seed=9)
    assert files_of(tmp_path / "s1") == files_of(tmp_path / "s2")
    rows = rows_of(tmp_path / "s1")
    assert r1["examples"] == 8 and r1["tasks"] == {"derain": 2, "denoise": 2, "deblur": 2, "low-light": 2}
    prompts = {r["task"]: r["edit_prompt"] for r in rows}
    assert prompts == {"derain": "derain the image", "denoise": "denoise the noisy image",
                       "deblur": "deblur the blurry image", "low-light": "enhance the low-light image"}
    by = {(r["source"], r["degradation"]): r for r in rows}
    assert set(by[("c0.png", "rain")]["params"]) == {"density", "length", "angle", "intensity"}
    assert by[("c0.png", "noise")]["params"]["model"] in ("gaussian", "poisson")
    assert set(by[("c0.png", "low_light")]["params"]) == {"gamma", "gain", "sigma"}
    for r in rows:
        inp = np.asarray(Image.open(tmp_path / "s1" / r["input_image_file_name"]), dtype=np.int32)
        tgt = np.asarray(Image.open(tmp_path / "s1" / r["edited_image_file_name"]), dtype=np.int32)
        assert inp.shape == tgt.shape == (32, 40, 3) and not np.array_equal(inp, tgt)
        assert np.array_equal(tgt, np.asarray(Image.open(clean / r["source"])))  # the clean image is the target
    dark = by[("c0.png", "low_light")]
    assert np.asarray(Image.open(tmp_path / "s1" / dark["input_image_file_name"])).mean() < 0.6 * np.asarray(
        Image.open(tmp_path / "s1" / dark["edited_image_file_name"])).mean()
    instruct_data.synthesize(clean, tmp_path / "s3", seed=10, degradations="blur")
    assert rows_of(tmp_path / "s3")[0]["params"] != by[("c0.png", "blur")]["params"]
    with pytest.raises(TuneLabError, match="unknown degradation") as e:
        instruct_data.synthesize(clean, tmp_path / "s4", degradations=["snow"])
    assert e.value.input_name == "degradations" and not (tmp_path / "s4").exists()


def test_interrupted_build_resumes_without_duplicates(tmp_path, pairs_dirs):
    a, b = pairs_dirs

    class StopAfter3(Progress):
        def interrupted(self):
            return self.value >= 3

    with pytest.raises(Interrupted):
        instruct_data.from_folders(a, b, tmp_path / "r", seed=1, progress=StopAfter3)
    assert not (tmp_path / "r" / "metadata.jsonl").exists() and len(list((tmp_path / "r" / "input").iterdir())) == 3
    instruct_data.from_folders(a, b, tmp_path / "r", seed=1)
    instruct_data.from_folders(a, b, tmp_path / "fresh", seed=1)
    assert files_of(tmp_path / "r") == files_of(tmp_path / "fresh")
    with pytest.raises(TuneLabError, match="not empty") as e:  # a finished dataset is never overwritten
        instruct_data.from_folders(a, b, tmp_path / "r", seed=2)
    assert e.value.input_name == "output"


def test_table_import_with_presets(tmp_path):
    root = tmp_path / "table"
    (root / "img").mkdir(parents=True)
    rows = []
    for i, task in enumerate(["derain", "deblur", "denoise"]):
        photo(32, 32, seed=i).save(root / "img" / f"in{i}.png")
        photo(32, 32, seed=50 + i).save(root / "img" / f"gt{i}.png")
        rows.append({"input_image": f"img/in{i}.png", "instruction": instruct_data.TASK_PROMPTS[task].capitalize(),
                     "ground_truth_image": f"img/gt{i}.png"})
    (root / "low.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = instruct_data.from_table(root / "low.jsonl", tmp_path / "t1", columns="low-level")
    got = rows_of(res["folder"])
    assert [r["task"] for r in got] == ["derain", "deblur", "denoise"]
    assert got[0]["edit_prompt"] == "Derain the image"
    assert np.array_equal(np.asarray(Image.open(res["folder"] / got[2]["edited_image_file_name"])),
                          np.asarray(Image.open(root / "img" / "gt2.png")))
    csv_text = "original_image,edit_prompt,cartoonized_image\n" + "".join(
        f"img/in{i}.png,Cartoonize the following image.,img/gt{i}.png\n" for i in range(3))
    (root / "cartoon.csv").write_text(csv_text)
    res = instruct_data.from_table(root / "cartoon.csv", tmp_path / "t2", columns="cartoonization")
    assert res["tasks"] == {"cartoonize": 3}
    res = instruct_data.from_table(root / "cartoon.csv", tmp_path / "t3",
                                   columns="input=original_image,instruction=edit_prompt,edited=cartoonized_image")
    assert res["examples"] == 3


def test_dataset_refusals(tmp_path, pairs_dirs):
    a, b = pairs_dirs
    root = tmp_path / "table"
    root.mkdir()
    photo(32, 32).save(root / "in.png")
    photo(32, 24).save(root / "gt.png")
    photo(32, 32).save(root / "gt_ok.png")
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (tmp_path / "outside.png").write_bytes((root / "in.png").read_bytes())

    def table(name, rows):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return root / name

    cases = [
        (table("mismatch.jsonl", [{"input_image": "in.png", "edit_prompt": "x", "edited_image": "gt.png"}]),
         "tunelab", r"'in.png' \(32x32\) and 'gt.png' \(32x24\) differ in size", "pair"),
        (table("nocol.jsonl", [{"input_image": "in.png", "edit_prompt": "x", "edited_image": "gt_ok.png"}]),
         "low-level", "column 'instruction'", "columns"),
        (table("corrupt.jsonl", [{"input_image": "bad.png", "edit_prompt": "x", "edited_image": "gt_ok.png"}]),
         "tunelab", "'bad.png' is not a readable image", "input_image"),
        (table("escape.jsonl", [{"input_image": "../outside.png", "edit_prompt": "x", "edited_image": "gt_ok.png"}]),
         "tunelab", r"contains '\.\.'", "input_image"),
        (table("empty.jsonl", [{"input_image": "in.png", "edit_prompt": " ", "edited_image": "gt_ok.png"}]),
         "tunelab", "instruction is empty", "edit_prompt"),
    ]
    for path, columns, message, input_name in cases:
        out = tmp_path / f"out_{path.stem}"
        with pytest.raises(TuneLabError, match=message) as e:
            instruct_data.from_table(path, out, columns=columns)
        assert e.value.input_name == input_name, path.name
        assert not out.exists(), "nothing is written when a source is bad"
    # folders: a mismatched pair and a corrupt file name the files
    (b / "img05.png").unlink()
    photo(20, 20).save(b / "img05.png")
    with pytest.raises(TuneLabError, match="'img05.png' .*differ in size"):
        instruct_data.from_folders(a, b, tmp_path / "f1")
    (b / "img05.png").write_bytes(b"garbage")
    with pytest.raises(TuneLabError, match="'img05.png' is not a readable image"):
        instruct_data.from_folders(a, b, tmp_path / "f2")
    (b / "img05.png").unlink()
    with pytest.raises(TuneLabError, match="no target image .*'img05.png'"):
        instruct_data.from_folders(a, b, tmp_path / "f3")
    with pytest.raises(TuneLabError, match="no instruction"):
        instruct_data.from_folders(a, a, tmp_path / "f4", instructions="\n \n")
    assert not any((tmp_path / f"f{i}").exists() for i in range(1, 5))


# ---------------------------------------------------------------------------------------------------------------
# evaluation


@pytest.fixture
def small_dataset(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    photo(32, 32, seed=7).save(clean / "x.png")
    return instruct_data.synthesize(clean, tmp_path / "ds", degradations=["rain", "blur"], seed=0)["folder"]


def test_evaluate_writes_report_grids_and_layout(tiny_ip2p, small_dataset, tmp_path):
    out = tmp_path / "eval"
    ev = instruct.evaluate([("base", tiny_ip2p), ("same", tiny_ip2p)], small_dataset, steps=2, seed=0, out_dir=out)
    assert len(ev.rows) == 4 and {r["task"] for r in ev.rows} == {"derain", "deblur"}
    pairs = instruct_data.read(small_dataset)
    for r in ev.rows:
        saved = out / r["image"]
        assert r["image"] == f"{r['model']}/{r['example']}/steps@2-igs@1.5-gs@7.0.png" and saved.is_file()
        truth = next(p for p in pairs if p.name == r["example"]).images()[1]
        assert r["psnr"] == metrics.psnr(Image.open(saved), truth) and r["ssim"] == metrics.ssim(Image.open(saved), truth)
    # the output is exactly TuneLab's edit at the evaluation's settings
    first = ev.rows[0]
    inp = pil_to_tensor([next(p for p in pairs if p.name == first["example"]).images()[0]])
    again = instruct.edit(tiny_ip2p, inp, first["instruction"], steps=2, seed=0)
    assert np.array_equal(np.asarray(Image.open(out / first["image"])),
                          (again[0].numpy() * 255).round().astype(np.uint8))
    same = {(r["example"], r["psnr"]) for r in ev.rows if r["model"] == "base"}
    assert same == {(r["example"], r["psnr"]) for r in ev.rows if r["model"] == "same"}  # same pipe, same seed
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["steps"] == 2 and report["settings"]["image_guidance"] == 1.5
    assert set(report["summary"]["base"]["tasks"]) == {"derain", "deblur"}
    assert (out / "report.csv").read_text().count("\n") == 5 and (out / "summary.csv").is_file()
    table = (out / "report.txt").read_text()
    assert "PSNR" in table and "derain" in table and "base" in table
    grids = sorted((out / "grids").iterdir())
    assert len(grids) == 2 and Image.open(grids[0]).size[0] == 4 * 32  # input | base | same | ground truth
    limited = instruct.evaluate(tiny_ip2p, small_dataset, steps=1, limit=1)
    assert len(limited.rows) == 1 and limited.rows[0]["model"] == "tiny-ip2p" and not limited.paths["images"]


def test_evaluate_refusals(tiny_ip2p, tiny_sd15, small_dataset, tmp_path):
    with pytest.raises(TuneLabError, match="InstructPix2Pix"):
        instruct.evaluate([("sd", tiny_sd15)], small_dataset, steps=1)
    with pytest.raises(TuneLabError, match="metadata.jsonl is missing"):
        instruct.evaluate([tiny_ip2p], tmp_path, steps=1)
    with pytest.raises(TuneLabError, match="no models"):
        instruct.evaluate([], small_dataset, steps=1)


# ---------------------------------------------------------------------------------------------------------------
# nodes and command line


def test_nodes_are_registered_with_tooltips():
    from tunelab import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    for node_id, name in (("TuneLabInstructEdit", "TuneLab Instruct Edit"),
                          ("TuneLabInstructionDataset", "TuneLab Instruction Dataset"),
                          ("TuneLabInstructEvaluate", "TuneLab Instruct Evaluate")):
        cls = NODE_CLASS_MAPPINGS[node_id]
        assert NODE_DISPLAY_NAME_MAPPINGS[node_id] == name and cls.CATEGORY.startswith("TuneLab/")
        spec = cls.INPUT_TYPES()
        for section in spec.values():
            for input_name, entry in section.items():
                assert entry[1].get("tooltip"), f"{node_id}.{input_name} has no tooltip"
    edit = NODE_CLASS_MAPPINGS["TuneLabInstructEdit"].INPUT_TYPES()["required"]
    assert edit["instruction"][1]["default"] == "Generate a cartoonized version of the natural image"
    assert (edit["image_guidance"][1]["default"], edit["guidance"][1]["default"], edit["steps"][1]["default"]) == \
        (1.5, 7.0, 20)


def test_dataset_and_evaluate_nodes(tiny_ip2p, tmp_path, monkeypatch):
    from tunelab.nodes.instruct import InstructEdit, InstructEvaluate, InstructionDataset

    inp, out = tmp_path / "input", tmp_path / "output"
    (inp / "clean").mkdir(parents=True)
    out.mkdir()
    monkeypatch.setenv("TUNELAB_INPUT", str(inp))
    monkeypatch.setenv("TUNELAB_OUTPUT", str(out))
    photo(32, 32, seed=4).save(inp / "clean" / "a.png")
    node = InstructionDataset()
    args = dict(mode="synthesize", source="clean", target="", instruction_set="cartoonize synonyms (50 built-in)",
                instructions="", columns="tunelab", column_mapping="", degradations="rain,low_light", seed=0,
                resolution=0, limit=0, val_fraction=0.0, output_name="ds/one")
    res = node.build(**args)
    rel, count, preview = res["result"]
    assert rel == "ds/one" and count == 2 and preview.shape[0] == 1 and (out / "ds" / "one" / "metadata.jsonl").is_file()
    assert node.build(**args)["result"][1] == 2, "the same build again reuses the dataset"
    for bad, name in ((dict(output_name="../x"), "output_name"), (dict(source="../clean"), "source"),
                      (dict(source=str(inp / "clean")), "source"), (dict(mode="folders"), "target")):
        with pytest.raises(TuneLabError) as e:
            node.build(**{**args, **bad})
        assert e.value.input_name == name
    grids, table, plot = InstructEvaluate().evaluate(tiny_ip2p, "base", rel, 1, 1.5, 7.0, 0, 0, "ev", pipe_2=tiny_ip2p,
                                               label_2="again")["result"]
    assert grids.shape[0] == 2 and grids.shape[2] == 4 * 32 and "again" in table
    assert len(list(out.glob("ev/*/report.json"))) == 1
    with pytest.raises(TuneLabError) as e:
        InstructEvaluate().evaluate(tiny_ip2p, "base", "../ds/one", 1, 1.5, 7.0, 0, 0, "ev")
    assert e.value.input_name == "dataset"
    (edited,) = InstructEdit().edit(tiny_ip2p, pil_to_tensor([photo(20, 12)]), "x", 1.5, 7.0, 1, 0)
    assert edited.shape == (1, 12, 20, 3)


def test_cli_commands(tmp_path, capsys):
    from tunelab.cli import main

    photo(30, 18, seed=1).save(tmp_path / "in.png")
    assert main(["edit", "--image", str(tmp_path / "in.png"), "--instruction", "derain the image", "--steps", "1",
                 "--out", str(tmp_path / "out.png")]) == 0
    assert Image.open(tmp_path / "out.png").size == (30, 18)
    assert main(["edit", "--image", str(tmp_path / "in.png"), "--instruction", " ", "--out",
                 str(tmp_path / "no.png")]) == 2
    assert main(["edit", "--image", str(tmp_path / "in.png"), "--model", "tiny-sd15", "--out",
                 str(tmp_path / "no.png")]) == 2
    assert not (tmp_path / "no.png").exists()
    (tmp_path / "clean").mkdir()
    photo(32, 32).save(tmp_path / "clean" / "c.png")
    assert main(["instruct-data", "synth", "--clean", str(tmp_path / "clean"), "--degradations", "blur",
                 "--out", str(tmp_path / "ds")]) == 0
    assert main(["eval-ip2p", "--dataset", str(tmp_path / "ds"), "--model", "base=tiny-ip2p", "--steps", "1",
                 "--out", str(tmp_path / "ev")]) == 0
    text = capsys.readouterr().out
    assert "deblur" in text and "PSNR" in text and (tmp_path / "ev" / "base").is_dir()
    assert main(["instruct-data", "table", "--table", str(tmp_path / "missing.csv"), "--out",
                 str(tmp_path / "t")]) == 2


# ---------------------------------------------------------------------------------------------------------------
# fine-tuning


@pytest.fixture
def train_dataset(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    for i in range(3):
        photo(64, 64, seed=20 + i).save(clean / f"c{i}.png")
    return instruct_data.synthesize(clean, tmp_path / "tds", degradations=["rain", "low_light"], seed=0)["folder"]


def _train_cfg(folder, out, **kw):
    from tunelab.training.ip2p import Ip2pTrainConfig

    base = dict(data_dir=str(folder), output=str(out), model="tiny-ip2p", device="cpu", dtype="fp32", resolution=64,
                max_train_steps=3, train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3,
                conditioning_dropout_prob=0.1, checkpointing_steps=0, seed=1)
    base.update(kw)
    return Ip2pTrainConfig(**base)


def test_ip2p_finetune_saves_a_loadable_pipeline_and_leaves_the_shared_pipe(tiny_ip2p, train_dataset, tmp_path):
    from tunelab.core import models
    from tunelab.training.ip2p import train

    before = {k: v.clone() for k, v in tiny_ip2p.pipe.unet.state_dict().items()}
    res = train(_train_cfg(train_dataset, tmp_path / "tuned"))
    assert res.steps == 3 and len(res.losses) == 3 and all(math.isfinite(v) for v in res.losses)
    assert res.loss_curve_png.is_file() and (res.output / "model_index.json").is_file()
    after = tiny_ip2p.pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the shared pipe's UNet is untouched"
    tuned = models.load(str(res.output), device="cpu", dtype="fp32")
    assert tuned.family == "ip2p"
    img = pil_to_tensor([photo(32, 32)])
    a = instruct.edit(tuned, img, "derain the image", steps=1, seed=0)
    assert not torch.equal(a, instruct.edit(tiny_ip2p, img, "derain the image", steps=1, seed=0))
    with pytest.raises(TuneLabError) as e:  # the output folder is never overwritten
        train(_train_cfg(train_dataset, res.output))
    assert e.value.input_name == "output"


def test_ip2p_resume_is_exact_and_sd15_gets_8_channels(train_dataset, tmp_path):
    from tunelab.training.ip2p import train

    class StopAt2(Progress):
        def interrupted(self):
            return self.value >= 2

    full = train(_train_cfg(train_dataset, tmp_path / "full", max_train_steps=4))
    with pytest.raises(Interrupted):
        train(_train_cfg(train_dataset, tmp_path / "cut", max_train_steps=4), progress=StopAt2)
    resumed = train(_train_cfg(train_dataset, tmp_path / "cut", max_train_steps=4, resume="latest"))
    assert resumed.resumed_from is not None and resumed.losses == full.losses
    from safetensors.torch import load_file

    a = load_file(str(full.output / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed.output / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TuneLabError) as e:
        train(_train_cfg(train_dataset, tmp_path / "other", max_train_steps=4, resume="latest",
                         run_dir=str(tmp_path / "cut_run"), learning_rate=5e-4))
    assert e.value.input_name == "resume"
    from tunelab.training.__main__ import main

    assert main(["ip2p", "--data", str(train_dataset), "--out", str(tmp_path / "from_sd15"), "--model", "tiny-sd15",
                 "--device", "cpu", "--resolution", "64", "--max-train-steps", "1", "--train-batch-size", "1",
                 "--gradient-accumulation-steps", "1"]) == 0
    cfg = json.loads((tmp_path / "from_sd15" / "unet" / "config.json").read_text())
    assert cfg["in_channels"] == 8
    with pytest.raises(TuneLabError) as e:
        train(_train_cfg(train_dataset, tmp_path / "x", model="tiny-sdxl"))
    assert e.value.input_name == "model"
