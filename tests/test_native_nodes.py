"""TuneLab Weighted Prompt (CLIP), Weighted Prompt SDXL (CLIP) and Compare (native), offline.

ComfyUI is absent here, so host's native services are replaced by stand-ins: the prompt nodes get the diffusers
text encoders behind the same `TextEncoders` interface ComfyUI's CLIP provides in host.py (the real-ComfyUI run is
tests/test_comfyui_native.py), and Compare (native) gets a backend that records what it is asked to do.
"""
import json

import pytest
import torch

from tunelab import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, host
from tunelab.core import native_compare
from tunelab.core import prompt as tl_prompt
from tunelab.core.errors import TuneLabError
from tunelab.nodes import native_compare as compare_node
from tunelab.nodes import native_prompt

EXAMPLE = "hyperrealistic death metal album cover featuring edgy moody realistic (human Super Mario)++, edgy and moody"


def _all_tooltips(cls):
    for section in cls.INPUT_TYPES().values():
        for name, spec in section.items():
            assert len(spec) > 1 and spec[1].get("tooltip"), (cls.__name__, name)


def test_registered_with_tooltips():
    for node_id, display in [("TuneLabWeightedPromptCLIP", "TuneLab Weighted Prompt (CLIP)"),
                             ("TuneLabWeightedPromptSDXLCLIP", "TuneLab Weighted Prompt SDXL (CLIP)"),
                             ("TuneLabCompareNative", "TuneLab Compare (native)")]:
        cls = NODE_CLASS_MAPPINGS[node_id]
        assert NODE_DISPLAY_NAME_MAPPINGS[node_id] == display
        assert cls.CATEGORY.startswith("TuneLab/")
        _all_tooltips(cls)
    assert native_prompt.WeightedPromptCLIP.RETURN_TYPES == ("CONDITIONING", "CONDITIONING")
    assert compare_node.CompareNative.OUTPUT_NODE


@pytest.fixture
def clip_as(monkeypatch, encoders_of, tiny_sdxl, tiny_refiner, tiny_sd15):
    """Make host treat the string 'sdxl' / 'sdxl-refiner' / 'sd15' as a native CLIP of that family."""
    handles = {"sdxl": tiny_sdxl, "sdxl-refiner": tiny_refiner, "sd15": tiny_sd15}
    monkeypatch.setattr(host, "clip_text_encoders", lambda clip: (clip, encoders_of(handles[clip])))
    monkeypatch.setattr(host, "clip_cond_extras", lambda clip: {"hooks": "from-clip"})
    return handles


def test_weighted_prompt_clip_builds_native_conditioning(clip_as):
    node = native_prompt.WeightedPromptCLIP()
    pos, neg = node.encode("sdxl", EXAMPLE, "wrong", width=832, height=1216, target_width=896, target_height=1152)
    ref = tl_prompt.encode(clip_as["sdxl"], EXAMPLE, "wrong")
    (pe, pd), = pos
    (ne, nd), = neg
    assert torch.equal(pe, ref.embeds) and torch.equal(ne, ref.negative_embeds)
    assert torch.equal(pd["pooled_output"], ref.pooled) and torch.equal(nd["pooled_output"], ref.negative_pooled)
    assert {k: pd[k] for k in ("width", "height", "crop_w", "crop_h", "target_width", "target_height")} == {
        "width": 832, "height": 1216, "crop_w": 0, "crop_h": 0, "target_width": 896, "target_height": 1152}
    assert pd["hooks"] == "from-clip"  # what CLIPTextEncode adds from Set CLIP Hooks

    pos, neg = node.encode("sdxl-refiner", "a cat", "", width=640, height=512, aesthetic_score=7.0,
                           negative_aesthetic_score=2.0)
    assert set(pos[0][1]) == {"pooled_output", "aesthetic_score", "width", "height", "hooks"}
    assert (pos[0][1]["aesthetic_score"], neg[0][1]["aesthetic_score"], pos[0][1]["width"]) == (7.0, 2.0, 640)

    pos, neg = node.encode("sd15", "a cat", "An old castle. " * 8)
    assert pos[0][0].shape == neg[0][0].shape and pos[0][0].shape[1] == 154  # the pair padded to one length
    assert pos[0][1] == {"hooks": "from-clip"}


def test_weighted_prompt_clip_refuses_bad_syntax_naming_the_input(clip_as):
    node = native_prompt.WeightedPromptCLIP()
    with pytest.raises(TuneLabError, match=r"^negative: .*never closed"):
        node.encode("sdxl", "a cat", "(blurry")
    with pytest.raises(TuneLabError, match=r"^positive: .*A1111"):
        node.encode("sdxl", "(cat:1.2)", "")


def test_sdxl_split_node(clip_as):
    node = native_prompt.WeightedPromptSDXLCLIP()
    pos, neg = node.encode("sdxl", "a (red)++ car", "", "wrong", "")  # empty _l: the same as _g
    ref = tl_prompt.encode(clip_as["sdxl"], "a (red)++ car", "wrong")
    assert torch.equal(pos[0][0], ref.embeds) and torch.equal(neg[0][1]["pooled_output"], ref.negative_pooled)
    pos, _ = node.encode("sdxl", "a (red)++ car", "a photo", "wrong", "")
    assert not torch.equal(pos[0][0], ref.embeds)
    assert torch.equal(pos[0][0][..., 32:], ref.embeds[..., 32:])  # CLIP-G part unchanged, CLIP-L differs
    with pytest.raises(TuneLabError, match=r"^positive_l: "):
        node.encode("sdxl", "a car", "(oops", "", "")
    with pytest.raises(TuneLabError, match="^clip: .*SDXL"):
        node.encode("sd15", "a car", "a photo", "", "")


# ---------------------------------------------------------------------------------------------------------------
# Compare (native) with a recording backend


class Backend:
    def __init__(self):
        self.log = []

    def clip_encode_pair(self, clip, text, negative, sizes=None):
        self.log.append(("encode", clip, text, negative, dict(sizes)))
        return [("pos", clip, text)], [("neg", clip, negative)]

    def native_text_encode(self, clip, text):
        self.log.append(("text", clip, text))
        return [("text", clip, text)]

    def native_lora(self, model, clip, name, sm, sc):
        self.log.append(("lora", model, clip, name, sm, sc))
        return model + "+lora", clip + "+lora", {"w": 1}, 7

    def lora_hooks(self, tensors, sm, sc):
        self.log.append(("hooks", sm, sc))
        return "hooks"

    def with_hooks(self, cond, hooks):
        return [("hooked", cond, hooks)]

    def empty_latent(self, w, h):
        return {"samples": torch.zeros(1, 4, h // 8, w // 8)}

    def ksample(self, model, seed, steps, cfg, sampler, scheduler, pos, neg, latent, **kw):
        self.log.append(("sample", model, pos, neg, kw))
        return {"samples": latent["samples"] + len(self.log)}

    def vae_decode(self, vae, latent):
        v = float(latent["samples"].mean()) % 1
        return torch.full((1, 64, 64, 3), v)

    def check_interrupt(self):
        pass

    def comfyui_version(self):
        return "0.8.0"


def _settings(**kw):
    return native_compare.Settings(**{"prompt": "a castle", "seed": 3, "steps": 10, "width": 64, "height": 64,
                                      "lora_name": "wrong.safetensors", **kw})


def test_states_and_what_each_runs():
    backend = Backend()
    chosen = native_compare.states(list(native_compare.STATE_KEYS))
    result, panels = native_compare.run(backend, "M", "C", "V", chosen, _settings())
    samples = [e for e in backend.log if e[0] == "sample"]
    assert [s[1] for s in samples] == ["M", "M", "M+lora", "M"]
    assert samples[0][3] == [("neg", "C", "")] and samples[1][3] == [("neg", "C", "wrong")]
    assert samples[2][2] == [("pos", "C+lora", "a castle")]
    assert samples[3][3] == [("hooked", [("neg", "C", "wrong")], "hooks")]  # base CLIP, LoRA only on the negative
    assert samples[3][2] == [("pos", "C", "a castle")]
    assert [e for e in backend.log if e[0] == "lora"] == [("lora", "M", "C", "wrong.safetensors", 1.0, 1.0)]
    sizes = [e[4] for e in backend.log if e[0] == "encode"]
    assert sizes[0] == {"width": 64, "height": 64, "crop_w": 0, "crop_h": 0, "target_width": 64, "target_height": 64}
    assert panels.shape == (4, 64, 64, 3) and len(result.panels) == 4
    assert result.grid.size[0] == 4 * 64
    s = result.settings
    assert [st["label"] for st in s["states"]] == ["base", "base + negative 'wrong'", "LoRA + negative 'wrong'",
                                                    "LoRA on the negative only, negative 'wrong'"]
    assert s["states"][3]["lora"]["strength_clip"] is None and s["lora"]["mapped_modules"] == 7
    assert s["versions"]["comfyui"] == "0.8.0" and json.dumps(s)


def test_comfyui_syntax_uses_cliptextencode_and_no_lora_without_lora_states():
    backend = Backend()
    native_compare.run(backend, "M", "C", "V", native_compare.states(["base", "base_negative"]),
                       _settings(syntax="comfyui", lora_name=None))
    assert not [e for e in backend.log if e[0] in ("encode", "lora")]
    assert [e[2] for e in backend.log if e[0] == "text"] == ["a castle", "", "a castle", "wrong"]


def test_refiner_hands_off_like_ksampler_advanced():
    backend = Backend()
    native_compare.run(backend, "M", "C", "V", native_compare.states(["lora_negative"]), _settings(steps=10),
                       refiner=("RM", "RC"))
    base, refine = [e for e in backend.log if e[0] == "sample"]
    assert base[1] == "M+lora" and base[4] == {"start_step": 0, "last_step": 8, "add_noise": True,
                                               "force_full_denoise": False}
    assert refine[1] == "RM" and refine[4] == {"start_step": 8, "last_step": 10000, "add_noise": False,
                                               "force_full_denoise": True}
    assert refine[2] == [("pos", "RC", "a castle")]  # the refiner's own CLIP, never the LoRA
    assert native_compare.Settings(prompt="x", seed=0, steps=25).switch_step() == 20


@pytest.mark.parametrize("kw,chosen,refiner,problem", [
    ({}, [], None, "^states: no state"),
    ({"prompt": " "}, ["base"], None, "^prompt: the prompt is empty"),
    ({"prompt": "(cat"}, ["base"], None, "^prompt: .*never closed"),
    ({"lora_name": None}, ["lora_negative_only"], None, "^lora_name: "),
    ({"width": 60}, ["base"], None, "^width: 60 is not a multiple of 8"),
    ({"steps": 0}, ["base"], None, "^steps: "),
    ({}, ["base"], ("RM", None), "^refiner_clip: "),
    ({"syntax": "a1111"}, ["base"], None, "^prompt_syntax: "),
])
def test_bad_input_refused_before_any_model_work(kw, chosen, refiner, problem):
    backend = Backend()
    with pytest.raises(TuneLabError, match=problem):
        native_compare.run(backend, "M", "C", "V", native_compare.states(chosen), _settings(**kw), refiner=refiner)
    assert backend.log == []


def test_compare_native_node_writes_grid_panels_settings(monkeypatch, session_dir):
    from pathlib import Path

    backend = Backend()
    for name in ("clip_encode_pair", "native_text_encode", "native_lora", "lora_hooks", "with_hooks",
                 "empty_latent", "ksample", "vae_decode", "check_interrupt", "comfyui_version"):
        monkeypatch.setattr(host, name, getattr(backend, name))
    node = compare_node.CompareNative()
    out = node.compare(model="M", clip="C", vae="V", lora_name="wrong.safetensors", prompt="a castle",
                       negative="wrong", seed=1, steps=4, cfg=7.0, sampler_name="euler", scheduler="normal",
                       width=64, height=64, lora_negative_only=True, output_name="native_node_test")
    grid, panels = out["result"]
    assert panels.shape == (4, 64, 64, 3) and grid.shape[0] == 1
    names = [i["filename"] for i in out["ui"]["images"]]
    assert names == ["grid.png", "01.png", "02.png", "03.png", "04.png"]
    folder = Path(host.output_dir()) / out["ui"]["images"][0]["subfolder"]
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["native"] and len(settings["states"]) == 4
    with pytest.raises(TuneLabError, match="^output_name: "):
        node.compare(model="M", clip="C", vae="V", lora_name="x", prompt="a", negative="", seed=1, steps=1, cfg=1.0,
                     sampler_name="euler", scheduler="normal", width=64, height=64, output_name="../outside")
