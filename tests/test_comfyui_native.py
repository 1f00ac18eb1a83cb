"""Native ComfyUI nodes in real ComfyUI 0.8.0 (marked comfyui): TuneLab Weighted Prompt (CLIP) equals compel,
TuneLab Compare (native) equals graphs of ComfyUI's own nodes, and both native workflows run through the queue.

ComfyUI's loaders only know full-size model types, so `tests/comfyui_tiny_models.py` (a test-only extension,
imported into the ComfyUI process) registers the tiny architectures: tiny-sdxl, tiny-sdxl-refiner and tiny-sd15
single-file checkpoints are written here from the presets, with their text-encoder weights rounded to fp16 (ComfyUI
stores text encoders in fp16 and computes in fp32, so both sides hold the same weights) and their token tables padded
to ComfyUI's 49408 rows. ComfyUI reads only its full-size VAE layout, so the SDXL checkpoint carries a full-size VAE
with fixed random weights; everything else is tiny. The LoRA is the built-in tiny wrong LoRA plus random CLIP-L/G
parts (kohya keys), so LoRA states change both the UNet and the text encoders.

`tests/comfyui_native_probe.py` runs in ComfyUI's own environment, imports the pack from its folder as ComfyUI does
and calls the node classes (TuneLab's and ComfyUI's) directly; one probe run serves the tests of this file. The
workflow tests start a ComfyUI server with the pack and the tiny extension and run the API workflows through
`python -m tunelab queue`.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfyui

HERE = Path(__file__).resolve().parent
PACK = HERE.parent
TOLERANCE = 1e-5
LONG_154 = ("An old stone castle on a hill under a stormy sky. Ravens circle the tower. "
            "A road winds up to the gate, lit by (flickering torches)1.3. Knights gather at a (wooden table)-. "
            "In the distance a (dragon)++ sleeps on a mountain of gold, and a river runs past the walls into the "
            "dark forest. Lanterns (glow)0.7 on the bridge.")


def _comfy_root() -> Path:
    root = Path(os.environ["COMFYUI_PATH"]).expanduser().resolve()
    if not (root / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={root} has no main.py; point it at a ComfyUI checkout")
    return root


def _comfy_python(root: Path) -> str:
    venv = root / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


# ---------------------------------------------------------------------------------------------------------------
# assets: tiny checkpoints ComfyUI can load, a LoRA with UNet and CLIP parts


def _fp16_text_encoders(pipe):
    for te in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)):
        if te is not None:
            for p in te.parameters():
                p.data = p.data.half().float()
    return pipe


def _pad_token_tables(sd: dict) -> dict:
    for k in list(sd):
        if k.endswith("token_embedding.weight"):
            t = sd[k]
            padded = torch.zeros(49408, t.shape[1], dtype=t.dtype)
            padded[:t.shape[0]] = t
            sd[k] = padded
    return sd


def _full_size_vae(seed: int = 7) -> dict:
    """SD/SDXL's VAE architecture (the only layout ComfyUI's VAE loader reads) with fixed random weights, fp16."""
    import ldm_layout
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025)
    return {k: v.half() for k, v in ldm_layout.vae_to_ldm(vae.state_dict(), vae.config).items()}


def _te_lora(widths: dict, *, rank=4, seed=11, std=0.15) -> dict:
    """Random kohya LoRA tensors for the tiny text encoders (lora_te1 = CLIP-L, lora_te2 = CLIP-G)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, width in widths.items():
        for layer in range(3):
            for module in ("self_attn_q_proj", "self_attn_v_proj", "mlp_fc1"):
                key = f"{prefix}_text_model_encoder_layers_{layer}_{module}"
                out_features = width * 2 if module == "mlp_fc1" else width
                out[f"{key}.lora_down.weight"] = torch.randn(rank, width, generator=g) * std
                out[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, generator=g) * std
                out[f"{key}.alpha"] = torch.tensor(float(rank))
    return out


@pytest.fixture(scope="session")
def native_assets(tmp_path_factory):
    import ldm_layout
    from safetensors.torch import load_file, save_file

    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from tunelab.core import tiny

    root = tmp_path_factory.mktemp("native")
    (root / "checkpoints").mkdir()
    (root / "loras").mkdir()
    (root / "output").mkdir()
    tiny.write_tokenizer_files(root / "tokenizer")
    ckpts, folders = {}, {}
    for family, preset, cls in (("sdxl", "tiny-sdxl", StableDiffusionXLPipeline),
                                ("sdxl-refiner", "tiny-sdxl-refiner", StableDiffusionXLImg2ImgPipeline),
                                ("sd15", "tiny-sd15", StableDiffusionPipeline)):
        folders[family] = str(tiny.ensure(preset))
        pipe = _fp16_text_encoders(cls.from_pretrained(folders[family], local_files_only=True))
        sd = _pad_token_tables(ldm_layout.pipeline_to_ldm(pipe))
        sd = {k: v for k, v in sd.items() if not k.startswith(ldm_layout.VAE)}
        if family == "sdxl":
            sd.update(_full_size_vae())
        ckpts[family] = root / "checkpoints" / f"{preset}.safetensors"
        save_file(sd, str(ckpts[family]))
    lora = dict(load_file(str(tiny.wrong_lora())))
    lora.update(_te_lora({"lora_te1": tiny.TE1_WIDTH, "lora_te2": tiny.TE2_WIDTH}))
    save_file(lora, str(root / "loras" / "tiny_wrong_te.safetensors"))
    return {"root": root, "checkpoints": ckpts, "diffusers": folders, "lora": "tiny_wrong_te.safetensors",
            "tokenizer": root / "tokenizer"}


# ---------------------------------------------------------------------------------------------------------------
# the probe


def _cases():
    sys.path.insert(0, str(HERE))
    import test_prompt

    cases = [(cid, list(pair)) for cid, pair in zip(test_prompt.CASE_IDS, test_prompt.CASES)]
    cases.append(("long-154", [LONG_154, "wrong, (blurry)0.5"]))
    return cases


SPLIT_CASES = [
    ("split-short", ["a (red)++ car on a bridge", "a photo of a car", "wrong", ""]),
    ("split-long-l", ["a cat+", "An old stone castle on a hill under a stormy sky. Ravens circle the tower. A road "
                      "winds up to the gate, lit by (flickering torches)1.3, then (more)-", "(ugly)0.6", "wrong"]),
    ("split-blend", ['("a red car", "a blue car").blend(1, 0.5)', "a car (in the rain)0.8", "", "blurry"]),
]
LORA_CASES = [("lora-plain", ["a photo of a cat", "wrong"]), ("lora-down", ["a (cat)0.5 on a (mat)1.3", "(ugly)-"])]


@pytest.fixture(scope="session")
def probe(native_assets, tmp_path_factory):
    root = _comfy_root()
    work = tmp_path_factory.mktemp("probe")
    job = {"pack": str(PACK), "tokenizer": str(native_assets["tokenizer"]),
           "checkpoints": str(native_assets["root"] / "checkpoints"), "loras": str(native_assets["root"] / "loras"),
           "output": str(native_assets["root"] / "output"), "lora": native_assets["lora"],
           "diffusers": native_assets["diffusers"],
           "prompt_checkpoints": {f: str(p) for f, p in native_assets["checkpoints"].items()},
           "cases": _cases(), "split_cases": SPLIT_CASES, "lora_cases": LORA_CASES,
           "compare": {"checkpoint": native_assets["checkpoints"]["sdxl"].name, "steps": 4, "seed": 5, "width": 64,
                       "height": 64, "sampler_name": "euler", "scheduler": "normal", "cfg": 5.0,
                       "prompt": "a (castle)1.2 on a hill at dusk, (fog)-", "negative": "wrong"},
           "parts": os.environ.get("TUNELAB_NATIVE_PARTS", "prompt,compare").split(",")}
    (work / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([_comfy_python(root), str(HERE / "comfyui_native_probe.py"), str(work / "job.json"),
                           str(work / "out.json")], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not (work / "out.json").is_file():
        pytest.fail(f"the probe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    result = json.loads((work / "out.json").read_text())
    print("probe timings (s):", result["timings"])
    return result


def _table(rows) -> str:
    keys = ("embeds", "negative_embeds", "pooled", "negative_pooled")
    lines = [f"{'case':34s} " + " ".join(f"{k:>15s}" for k in keys) + "  tokens"]
    for r in rows:
        cells = " ".join(f"{'-':>15s}" if r[k] is None else f"{r[k]:15.2e}" for k in keys)
        lines.append(f"{r['case'][:34]:34s} {cells}  {r.get('tokens', '')}")
    return "\n".join(lines)


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner", "sd15", "sdxl-split"])
def test_weighted_prompt_clip_equals_compel(probe, family):
    rows = probe["prompt"][family]
    print(f"\n{family}: max abs difference to compel\n{_table(rows)}")
    for r in rows:
        for k in ("embeds", "negative_embeds", "pooled", "negative_pooled"):
            if family in ("sd15",) and k.endswith("pooled"):
                assert r[k] is None, (r["case"], k)
            else:
                assert r[k] is not None and r[k] <= TOLERANCE, (r["case"], k, r[k])
    tokens = {r["tokens"] for r in rows}
    assert {77, 154, 231} <= tokens or family == "sdxl-split", tokens  # 1, 2 and 3 chunks are covered


def test_weighted_prompt_clip_sees_clip_loras(probe):
    """A LoRA on the CLIP (native LoraLoader) changes the encoding, and the result is compel's on the patched
    weights; for a plain prompt the tensors are CLIPTextEncode's, bit for bit."""
    rows = probe["prompt"]["sdxl-lora-clip"]
    print(f"\nLoRA on CLIP:\n{_table(rows)}")
    for r in rows:
        assert r["changed_by_lora"] > 1e-3, r
        for k in ("embeds", "negative_embeds", "pooled", "negative_pooled"):
            assert r[k] <= TOLERANCE, (r["case"], k, r[k])
    assert probe["prompt"]["plain_equals_cliptextencode"]


# ---------------------------------------------------------------------------------------------------------------
# TuneLab Compare (native)


def test_compare_native_equals_hand_wired_graph(probe):
    """comfyui syntax: each panel is bit-identical to Load Checkpoint -> (LoraLoader) -> CLIPTextEncode x2 ->
    KSampler -> VAE Decode; the negative-only panel to the same graph with Create Hook LoRA + Cond Set Props on the
    negative. compel syntax: the same graphs with TuneLab Weighted Prompt (CLIP) as the text encoder."""
    got = probe["compare"]
    print("\ncomfyui syntax:", got["comfyui_syntax"], "\ncompel syntax:", got["compel_syntax"])
    assert [p["equal"] for p in got["comfyui_syntax"]] == [True] * 4
    assert [p["equal"] for p in got["compel_syntax"]] == [True] * 4


def test_compare_native_leaves_model_and_clip_unchanged(probe):
    got = probe["compare"]
    assert got["before_after"]["equal"], got["before_after"]
    assert got["before_equals_base_panel"]["equal"]


def test_negative_only_state_differs(probe):
    got = probe["compare"]["negative_only_vs"]
    print("\nnegative-only vs:", got)
    assert not got["base_negative"]["equal"] and got["base_negative"]["max_diff"] > 1e-3
    assert not got["lora_negative"]["equal"] and got["lora_negative"]["max_diff"] > 1e-3


def test_compare_native_refiner_hands_off_like_ksampler_advanced(probe):
    got = probe["compare"]
    print("\nrefiner:", got["refiner"])
    assert [p["equal"] for p in got["refiner"]] == [True, True]
    assert not got["refiner_changes_panels"]["equal"]


def test_compare_native_writes_grid_panels_settings(probe):
    got = probe["compare"]
    assert got["files"] == ["01.png", "02.png", "03.png", "04.png", "grid.png", "settings.json"]
    assert got["ui_images"][0] == "grid.png" and len(got["ui_images"]) == 5
    s = got["settings"]
    assert s["native"] and s["prompt_syntax"] == "comfyui" and s["lora"]["mapped_modules"] > 0
    assert [st["state"] for st in s["states"]] == ["base", "base_negative", "lora_negative", "lora_negative_only"]
    assert s["versions"]["comfyui"] == "0.8.0"


# ---------------------------------------------------------------------------------------------------------------
# the native workflows through the queue client, on a ComfyUI server with the pack and the tiny model types


@pytest.fixture(scope="module")
def native_server(native_assets, tmp_path_factory):
    import socket
    import time
    import urllib.request

    root = _comfy_root()
    work = tmp_path_factory.mktemp("native_server")
    for sub in ("output", "temp", "user", "custom_nodes"):
        (work / sub).mkdir()
    if not (root / "custom_nodes" / "tunelab").exists():
        (work / "custom_nodes" / "tunelab").symlink_to(PACK, target_is_directory=True)
    (work / "custom_nodes" / "comfyui_tiny_models.py").symlink_to(HERE / "comfyui_tiny_models.py")
    assets = native_assets["root"]
    (work / "extra_model_paths.yaml").write_text(
        f"tunelab_native_test:\n    base_path: {assets}\n    checkpoints: checkpoints\n    loras: loras\n"
        f"    custom_nodes: {work / 'custom_nodes'}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log_path = work / "comfyui.log"
    log = open(log_path, "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNELAB_TINY_TOKENIZER": str(native_assets["tokenizer"]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [_comfy_python(root), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--disable-auto-launch", "--output-directory", str(work / "output"), "--temp-directory", str(work / "temp"),
         "--user-directory", str(work / "user"), "--database-url", "sqlite:///:memory:",
         "--extra-model-paths-config", str(work / "extra_model_paths.yaml")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + float(os.environ.get("TUNELAB_COMFY_START_TIMEOUT", "300"))
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer in time:\n{log_path.read_text(errors='replace')[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield {"url": url, "output": work / "output", "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _queue(server, workflow: Path, out: Path, sets, capsys):
    from tunelab import cli

    args = ["queue", str(workflow), "--server", server["url"], "--out", str(out), "--timeout", "600"]
    for s in sets:
        args += ["--set", s]
    rc = cli.main(args)
    captured = capsys.readouterr()
    assert rc == 0, f"{captured.out}\n{captured.err}\n{server['log'].read_text(errors='replace')[-3000:]}"
    return sorted(out.glob("*.png")), captured.out


def _pixels(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


API = PACK / "workflows" / "api"
SMALL = ["KSampler.steps=3", "Empty latent.width=64", "Empty latent.height=64"]


def test_weighted_prompt_native_workflow_runs(native_server, tmp_path, capsys):
    images, out = _queue(native_server, API / "weighted_prompt_native.json", tmp_path / "out",
                         ["Load SDXL base.ckpt_name=tiny-sdxl.safetensors", *SMALL], capsys)
    assert "success" in out
    assert len(images) == 1 and _pixels(images[0]).shape == (64, 64, 3)


def test_three_way_comparison_native_workflow_runs_and_matches_native_nodes(native_server, tmp_path, capsys):
    """Through the queue in a real server: the workflow runs; and with a Save Image on its `panels` output beside
    the same four states wired from ComfyUI's own nodes (LoraLoader, CLIPTextEncode, KSampler, VAE Decode, Create
    Hook LoRA, Cond Set Props) in one graph, both give the same pixels (both quantized by Save Image)."""
    import numpy as np

    node = "Three-way comparison (native)"
    sets = ["Load SDXL base.ckpt_name=tiny-sdxl.safetensors", f"{node}.lora_name={LORA}", f"{node}.steps=3",
            f"{node}.width=64", f"{node}.height=64", f"{node}.prompt_syntax=comfyui", f"{node}.seed=9",
            f"{node}.lora_negative_only=true"]
    images, out = _queue(native_server, API / "three_way_comparison_native.json", tmp_path / "out", sets, capsys)
    assert "success" in out
    panels = sorted(p for p in images if re.fullmatch(r"0\d\.png", p.name))
    assert [p.name for p in images if p.name == "grid.png"] and len(panels) == 4, [p.name for p in images]

    graph = json.loads((API / "three_way_comparison_native.json").read_text())
    (cmp_id,) = [k for k, v in graph.items() if v["class_type"] == "TuneLabCompareNative"]
    graph["90"] = {"class_type": "SaveImage", "inputs": {"images": [cmp_id, 1], "filename_prefix": "tunelab_panels"}}
    graph.update(_native_graph(seed=9, steps=3))
    (tmp_path / "both.json").write_text(json.dumps(graph))
    saved, _ = _queue(native_server, tmp_path / "both.json", tmp_path / "both", sets, capsys)
    ours = sorted(p for p in saved if p.name.startswith("tunelab_panels_"))
    theirs = {p.name.split("_native_")[0]: p for p in saved if "_native_" in p.name}
    assert len(ours) == 4 and set(theirs) == {"base", "negative", "lora", "hooks"}, [p.name for p in saved]
    for panel, state in zip(ours, ("base", "negative", "lora", "hooks")):
        assert np.array_equal(_pixels(panel), _pixels(theirs[state])), (panel.name, state)
    assert not np.array_equal(_pixels(ours[3]), _pixels(ours[1]))
    assert not np.array_equal(_pixels(ours[3]), _pixels(ours[2]))


LORA = "tiny_wrong_te.safetensors"
PROMPT = ("hyperrealistic death metal album cover featuring edgy moody realistic (human Super Mario)++, "
          "edgy and moody")


def _native_graph(*, seed, steps):
    """API graph: the four states wired from ComfyUI's own nodes, each saved as <state>_native."""
    g = {"101": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sdxl.safetensors"}},
         "102": {"class_type": "LoraLoader", "inputs": {"model": ["101", 0], "clip": ["101", 1], "lora_name": LORA,
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
         "103": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
         "104": {"class_type": "CreateHookLora", "inputs": {"lora_name": LORA, "strength_model": 1.0,
                                                             "strength_clip": 1.0}}}

    def text(nid, clip, t):
        g[nid] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": t}}
        return [nid, 0]

    base_pos, base_empty = text("110", ["101", 1], PROMPT), text("111", ["101", 1], "")
    base_neg = text("112", ["101", 1], "wrong")
    lora_pos, lora_neg = text("113", ["102", 1], PROMPT), text("114", ["102", 1], "wrong")
    g["115"] = {"class_type": "ConditioningSetProperties", "inputs": {"cond_NEW": base_neg, "strength": 1.0,
                                                                      "set_cond_area": "default", "hooks": ["104", 0]}}
    for i, (name, model, pos, neg) in enumerate([("base", ["101", 0], base_pos, base_empty),
                                                 ("negative", ["101", 0], base_pos, base_neg),
                                                 ("lora", ["102", 0], lora_pos, lora_neg),
                                                 ("hooks", ["101", 0], base_pos, ["115", 0])]):
        k, d, s = f"12{i}", f"13{i}", f"14{i}"
        g[k] = {"class_type": "KSampler", "inputs": {"model": model, "seed": seed, "steps": steps, "cfg": 13.0,
                                                      "sampler_name": "euler", "scheduler": "normal",
                                                      "positive": pos, "negative": neg, "latent_image": ["103", 0],
                                                      "denoise": 1.0}}
        g[d] = {"class_type": "VAEDecode", "inputs": {"samples": [k, 0], "vae": ["101", 2]}}
        g[s] = {"class_type": "SaveImage", "inputs": {"images": [d, 0], "filename_prefix": f"{name}_native"}}
    return g
