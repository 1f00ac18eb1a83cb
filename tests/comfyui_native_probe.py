"""Runs inside ComfyUI's own environment (tests/test_comfyui_native.py starts it): TuneLab's native nodes against
compel and against graphs of ComfyUI's own nodes, on ComfyUI 0.8.0's real loaders, CLIP, samplers and hooks.

    python comfyui_native_probe.py JOB.json OUT.json   (cwd: the ComfyUI checkout, PYTHONPATH including it)

JOB names the pack folder, the tiny checkpoints/LoRA (written by the test), the tiny diffusers folders (for
compel) and the prompt cases. The pack is imported from its folder the way ComfyUI imports a custom node. OUT gets
JSON: per family and case the max abs differences to compel, and per graph comparison whether the images are equal.
"""
import importlib.util
import json
import os
import sys
import time

JOB = json.loads(open(sys.argv[1], encoding="utf-8").read())
OUT = sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]
os.environ["TUNELAB_TINY_TOKENIZER"] = JOB["tokenizer"]

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfyui_tiny_models  # noqa: E402,F401  (registers the tiny model types)
import folder_paths  # noqa: E402

import comfy.sd  # noqa: E402
import nodes as comfy_nodes  # noqa: E402

folder_paths.add_model_folder_path("checkpoints", JOB["checkpoints"], is_default=True)
folder_paths.add_model_folder_path("loras", JOB["loras"], is_default=True)
folder_paths.set_output_directory(JOB["output"])


def load_pack(folder):
    spec = importlib.util.spec_from_file_location("tunelab", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["tunelab"] = module
    spec.loader.exec_module(module)
    return module


PACK = load_pack(JOB["pack"])
from tunelab.nodes import native_compare, native_prompt  # noqa: E402

RESULT = {"timings": {}}


def tick(name, t0):
    RESULT["timings"][name] = round(time.perf_counter() - t0, 2)


# ---------------------------------------------------------------------------------------------------------------
# compel, straight from compel on diffusers' CLIP models (independent of TuneLab)


def fp16_weights(pipe):
    """ComfyUI keeps text encoders in fp16 and computes in fp32; the reference uses the same (fp16-exact) weights."""
    for te in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)):
        if te is not None:
            for p in te.parameters():
                p.data = p.data.half().float()
    return pipe


def _compel(tok, te, pooled):
    from compel import Compel, ReturnedEmbeddingsType

    return Compel(tokenizer=tok, text_encoder=te, truncate_long_prompts=False, requires_pooled=pooled,
                  returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED)


def compel_reference(pipe, family, prompt, negative, style=None, negative_style=None):
    """(embeds, negative_embeds, pooled, negative_pooled) from compel. compel#78 (weighted .and() on an encoder with
    pooled output crashes): the same math from compel's own parts, as tests/test_prompt.py does."""
    from compel import CompelForSD, CompelForSDXL

    with torch.no_grad():
        if family == "sdxl":
            try:
                out = CompelForSDXL(pipe)(prompt, negative_prompt=negative, style_prompt=style,
                                          negative_style_prompt=negative_style)
                return out.embeds, out.negative_embeds, out.pooled_embeds, out.negative_pooled_embeds
            except AttributeError:
                c1, c2 = _compel(pipe.tokenizer, pipe.text_encoder, False), _compel(pipe.tokenizer_2,
                                                                                    pipe.text_encoder_2, False)
                left = c1.pad_conditioning_tensors_to_same_length([c1(prompt), c1(negative)])
                right = c2.pad_conditioning_tensors_to_same_length([c2(prompt), c2(negative)])
                p = _compel(pipe.tokenizer_2, pipe.text_encoder_2, True).conditioning_provider
                return (torch.cat([left[0], right[0]], -1), torch.cat([left[1], right[1]], -1),
                        p.get_pooled_embeddings([prompt]), p.get_pooled_embeddings([negative]))
        if family == "sdxl-refiner":
            c = _compel(pipe.tokenizer_2, pipe.text_encoder_2, True)
            try:
                (e, p), (ne, np_) = c(prompt), c(negative)
            except AttributeError:
                plain = _compel(pipe.tokenizer_2, pipe.text_encoder_2, False)
                e, ne = plain(prompt), plain(negative)
                p = c.conditioning_provider.get_pooled_embeddings([prompt])
                np_ = c.conditioning_provider.get_pooled_embeddings([negative])
            e, ne = c.pad_conditioning_tensors_to_same_length([e, ne])
            return e, ne, p, np_
        out = CompelForSD(pipe)(prompt, negative_prompt=negative)
        return out.embeds, out.negative_embeds, None, None


def max_diff(a, b):
    if b is None:
        return None if a is None else float("inf")
    if a is None or tuple(a.shape) != tuple(b.shape):
        return float("inf")
    return float((a.float() - b.float()).abs().max())


def conditioning_parts(pos, neg):
    (pe, pd), = pos
    (ne, nd), = neg
    return pe, ne, pd.get("pooled_output"), nd.get("pooled_output")


def diffs(got, ref):
    return dict(zip(("embeds", "negative_embeds", "pooled", "negative_pooled"),
                    (max_diff(a, b) for a, b in zip(got, ref))))


# ---------------------------------------------------------------------------------------------------------------
# A: TuneLab Weighted Prompt (CLIP) == compel


def load_clip(ckpt):
    return comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_model=False)[1]


def pipeline(family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    cls = {"sdxl": StableDiffusionXLPipeline, "sdxl-refiner": StableDiffusionXLImg2ImgPipeline,
           "sd15": StableDiffusionPipeline}[family]
    return fp16_weights(cls.from_pretrained(JOB["diffusers"][family], local_files_only=True))


def comfy_state_to_diffusers(clip, pipe, family):
    """The CLIP's weights as ComfyUI holds them right now (with its LoRA patches) -> the diffusers encoders."""
    clip.load_model()
    sd = clip.cond_stage_model.state_dict()
    targets = {"l": pipe.text_encoder if family != "sdxl-refiner" else None,
               "g": getattr(pipe, "text_encoder_2", None)}
    for key, te in targets.items():
        if te is None:
            continue
        prefix = f"clip_{key}.transformer."
        own = te.state_dict()
        new = {}
        for name, value in sd.items():
            if name.startswith(prefix):
                k = name[len(prefix):]
                if k not in own:
                    k = k.removeprefix("text_model.")
                if k in own:
                    v = value.float()
                    new[k] = v[:own[k].shape[0]] if k.endswith("token_embedding.weight") else v
        te.load_state_dict(new, strict=False)


def part_a():
    t0 = time.perf_counter()
    out = {}
    node = native_prompt.WeightedPromptCLIP()
    for family, ckpt in JOB["prompt_checkpoints"].items():
        pipe, clip = pipeline(family), load_clip(ckpt)
        rows = []
        for case_id, (pos, neg) in JOB["cases"]:
            with torch.inference_mode():
                got = conditioning_parts(*node.encode(clip, pos, neg))
            ref = compel_reference(pipe, family, pos, neg)
            rows.append({"case": case_id, **diffs(got, ref), "tokens": int(got[0].shape[1])})
        out[family] = rows
        if family == "sdxl":
            split = native_prompt.WeightedPromptSDXLCLIP()
            out["sdxl-split"] = []
            for case_id, (pos_g, pos_l, neg_g, neg_l) in JOB["split_cases"]:
                with torch.inference_mode():
                    got = conditioning_parts(*split.encode(clip, pos_g, pos_l, neg_g, neg_l))
                ref = compel_reference(pipe, family, pos_l or pos_g, neg_l or neg_g, style=pos_g,
                                       negative_style=neg_g)
                out["sdxl-split"].append({"case": case_id, **diffs(got, ref), "tokens": int(got[0].shape[1])})
            # a LoRA on the CLIP (native LoraLoader): compel on the patched weights ComfyUI holds
            _, clip_lora = comfy_nodes.LoraLoader().load_lora(None, clip, JOB["lora"], 0.0, 1.0)
            out["sdxl-lora-clip"] = []
            for case_id, (pos, neg) in JOB["lora_cases"]:
                with torch.inference_mode():
                    got = conditioning_parts(*node.encode(clip_lora, pos, neg))
                    plain = conditioning_parts(*node.encode(clip, pos, neg))
                comfy_state_to_diffusers(clip_lora, pipe, family)
                ref = compel_reference(pipe, family, pos, neg)
                row = diffs(got, ref)
                row["changed_by_lora"] = max_diff(got[0], plain[0])
                out["sdxl-lora-clip"].append({"case": case_id, **row})
            native = comfy_nodes.CLIPTextEncode().encode(clip_lora, JOB["lora_cases"][0][1][0])[0]
            with torch.inference_mode():
                mine = node.encode(clip_lora, JOB["lora_cases"][0][1][0], "")[0]
            out["plain_equals_cliptextencode"] = bool(torch.equal(native[0][0], mine[0][0])
                                                      and torch.equal(native[0][1]["pooled_output"],
                                                                      mine[0][1]["pooled_output"]))
    RESULT["prompt"] = out
    tick("prompt", t0)


# ---------------------------------------------------------------------------------------------------------------
# B: TuneLab Compare (native) == graphs of ComfyUI's own nodes


def part_b():
    import comfy_extras.nodes_hooks as hook_nodes

    t0 = time.perf_counter()
    cfg = JOB["compare"]
    model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(cfg["checkpoint"])[:3]
    r_model, r_clip = comfy.sd.load_checkpoint_guess_config(JOB["prompt_checkpoints"]["sdxl-refiner"],
                                                            output_vae=False)[:2]
    steps, seed, w, h = cfg["steps"], cfg["seed"], cfg["width"], cfg["height"]
    sampler, scheduler, guidance = cfg["sampler_name"], cfg["scheduler"], cfg["cfg"]
    prompt, negative, lora = cfg["prompt"], cfg["negative"], JOB["lora"]
    out = {}

    def latent():
        return comfy_nodes.EmptyLatentImage().generate(w, h, 1)[0]

    def ksampler(m, pos, neg):
        return comfy_nodes.KSampler().sample(m, seed, steps, guidance, sampler, scheduler, pos, neg, latent())[0]

    def decode(lat):
        return comfy_nodes.VAEDecode().decode(vae, lat)[0]

    def text(c, t):
        return comfy_nodes.CLIPTextEncode().encode(c, t)[0]

    def compare_node(syntax, **kw):
        args = dict(model=model, clip=clip, vae=vae, lora_name=lora, prompt=prompt, negative=negative, seed=seed,
                    steps=steps, cfg=guidance, sampler_name=sampler, scheduler=scheduler, width=w, height=h,
                    prompt_syntax=syntax, base=True, base_negative=True, lora_negative=True,
                    lora_negative_only=True, output_name="native_test")
        args.update(kw)
        return native_compare.CompareNative().compare(**args)

    def hooked(cond):
        hooks = hook_nodes.CreateHookLora().create_hook(lora, 1.0, 1.0)[0]
        return hook_nodes.ConditioningSetProperties().set_properties(cond, 1.0, "default", hooks=hooks)[0]

    def same(a, b):
        return {"equal": bool(torch.equal(a, b)), "max_diff": float((a - b).abs().max())}

    with torch.inference_mode():
        before = decode(ksampler(model, text(clip, prompt), text(clip, "")))
        result = compare_node("comfyui")
        panels = result["result"][1]
        m_lora, c_lora = comfy_nodes.LoraLoader().load_lora(model, clip, lora, 1.0, 1.0)
        native = [
            decode(ksampler(model, text(clip, prompt), text(clip, ""))),
            decode(ksampler(model, text(clip, prompt), text(clip, negative))),
            decode(ksampler(m_lora, text(c_lora, prompt), text(c_lora, negative))),
            decode(ksampler(model, text(clip, prompt), hooked(text(clip, negative)))),
        ]
        after = decode(ksampler(model, text(clip, prompt), text(clip, "")))
        out["comfyui_syntax"] = [same(panels[i:i + 1], native[i]) for i in range(4)]
        plain_native = native
        out["before_after"] = same(before, after)
        out["before_equals_base_panel"] = same(before, panels[0:1])
        out["negative_only_vs"] = {"base_negative": same(panels[3:4], panels[1:2]),
                                   "lora_negative": same(panels[3:4], panels[2:3])}
        out["ui_images"] = [i["filename"] for i in result["ui"]["images"]]
        folder = os.path.join(JOB["output"], result["ui"]["images"][0]["subfolder"])
        out["files"] = sorted(os.listdir(folder))
        out["settings"] = json.loads(open(os.path.join(folder, "settings.json"), encoding="utf-8").read())

        # compel syntax: the same graph with TuneLab Weighted Prompt (CLIP) as the text encoder
        result = compare_node("compel")
        panels = result["result"][1]
        wp = native_prompt.WeightedPromptCLIP()

        def weighted(c, neg):
            return wp.encode(c, prompt, neg, width=w, height=h, crop_w=0, crop_h=0, target_width=w,
                             target_height=h)

        pos_b, neg_b = weighted(clip, "")
        pos_n, neg_n = weighted(clip, negative)
        pos_l, neg_l = weighted(c_lora, negative)
        native = [decode(ksampler(model, pos_b, neg_b)), decode(ksampler(model, pos_n, neg_n)),
                  decode(ksampler(m_lora, pos_l, neg_l)), decode(ksampler(model, pos_n, hooked(neg_n)))]
        out["compel_syntax"] = [same(panels[i:i + 1], native[i]) for i in range(4)]

        # a refiner handing off as two KSamplerAdvanced do
        switch = int(steps * 0.8 + 0.5)
        result = compare_node("comfyui", refiner_model=r_model, refiner_clip=r_clip, refiner_switch=0.8,
                              lora_negative_only=False, base=False)
        panels = result["result"][1]
        adv = comfy_nodes.KSamplerAdvanced()
        refined = []
        for m, c, neg in ((model, clip, negative), (m_lora, c_lora, negative)):
            lat = adv.sample(m, "enable", seed, steps, guidance, sampler, scheduler, text(c, prompt), text(c, neg),
                             latent(), 0, switch, "enable")[0]
            lat = adv.sample(r_model, "disable", seed, steps, guidance, sampler, scheduler, text(r_clip, prompt),
                             text(r_clip, neg), lat, switch, 10000, "disable")[0]
            refined.append(decode(lat))
        out["refiner"] = [same(panels[i:i + 1], refined[i]) for i in range(2)]
        out["refiner_changes_panels"] = same(panels[0:1], plain_native[1])
    RESULT["compare"] = out
    tick("compare", t0)


if __name__ == "__main__":
    parts = JOB.get("parts", ["prompt", "compare"])
    if "prompt" in parts:
        part_a()
    if "compare" in parts:
        part_b()
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(RESULT, f, indent=1)
