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
