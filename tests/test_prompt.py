"""Weighted prompting: compel-exact encoding, the weighting math, syntax errors with positions, batching, nodes.

The tiny presets use a character-level tokenizer, so ~75 characters fill one 77-token chunk.
"""
import math

import pytest
import torch

from tunelab.core import prompt as tl_prompt
from tunelab.core.errors import TuneLabError

EXAMPLE = "hyperrealistic death metal album cover featuring edgy moody realistic (human Super Mario)++, edgy and moody"
WRONG_KEYWORDS = ["low quality", "bad hands", "random text", "error", "missing or extra fingers", "cropped",
                  "jpeg artifacts", "signature", "watermark", "blurry", "ugly", "duplicate", "mutilated"]
WRONG_PROMPT = ", ".join(WRONG_KEYWORDS).replace("random text", "(random text)++++")
LONG = ("An old stone castle on a hill under a stormy sky. Ravens circle the tower. "
        "A road winds up to the gate, lit by (flickering torches)1.3. Knights gather at a (wooden table)-. "
        "In the distance a (dragon)++ sleeps on a mountain of gold.")
LONG_CHUNKS = 3  # over 150 tokens with the char-level tokenizer (checked in test_shapes_per_family)


# (positive, negative): every syntax form and nesting, 0/1/many weights, long prompts on either side, unicode
CASES = [
    ("a photo of a cat", "wrong"),
    ("word+ and more", ""),
    ("word- and more", "wrong"),
    ("(multi word)++ rest", "wrong"),
    ("(x)1.3 rest", "wrong"),
    ("(a (b)+)- c", "wrong"),
    ("(x)0 with a zero weight", "wrong"),
    ('("a red car", "a blue car").blend(1, 0.8)', "wrong"),
    ('("a cat", "a dog").blend(0.5, 0.25, no_normalize)', ""),
    ('("part one","part two").and()', "wrong"),
    ('("part one", "part two").and(1, 0.5)', "wrong"),
    ('"quoted words"+ and x.attend(1.2)', ""),
    (r"\(literal parens\) and a \"quote\"", "wrong"),
    ("a+ b- (c d)1.4 (e)0.5 f++ g-- (h)0.8", "(blurry)++, lowres-"),
    (WRONG_PROMPT, ""),
    (EXAMPLE, "wrong"),
    (LONG, "wrong"),
    ("a cat+", LONG),
    ("ü ñ 日本 (émoji 🙂)+ café", "ärger-"),
]
CASE_IDS = [f"{i:02d}-{p[:24]}" for i, (p, _) in enumerate(CASES)]
FAMILY_FIXTURES = {"sdxl": "tiny_sdxl", "sdxl-refiner": "tiny_refiner", "sd15": "tiny_sd15", "ip2p": "tiny_ip2p"}
IP2P_CASES = [CASES[i] for i in (0, 5, 7, 10, 16)]  # same code path as SD1.5; a subset keeps the suite fast



# ---------------------------------------------------------------------------------------------------------------
# references: compel itself, built here independently of core/prompt.py


def _compel_for(pipe, which, pooled=False):
    from compel import Compel, ReturnedEmbeddingsType

    tok, te = (pipe.tokenizer, pipe.text_encoder) if which == 1 else (pipe.tokenizer_2, pipe.text_encoder_2)
    return Compel(tokenizer=tok, text_encoder=te, truncate_long_prompts=False, requires_pooled=pooled,
                  returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED)


def _pieces_reference(pipe, family, prompt, negative):
    """compel#78: compel's pooled encoders crash on .and() with weights; same math from compel's own parts."""
    c2, pooled = _compel_for(pipe, 2), _compel_for(pipe, 2, pooled=True)
    embeds = c2.pad_conditioning_tensors_to_same_length([c2(prompt), c2(negative)])
    if family == "sdxl":
        c1 = _compel_for(pipe, 1)
        left = c1.pad_conditioning_tensors_to_same_length([c1(prompt), c1(negative)])
        assert left[0].shape[1] == embeds[0].shape[1]
        embeds = [torch.cat([a, b], dim=-1) for a, b in zip(left, embeds)]
    provider = pooled.conditioning_provider
    return embeds[0], embeds[1], provider.get_pooled_embeddings([prompt]), provider.get_pooled_embeddings([negative])


def compel_reference(pipe, family, prompt, negative):
    """(embeds, negative_embeds, pooled, negative_pooled) straight from compel."""
    from compel import CompelForSD, CompelForSDXL

    with torch.no_grad():
        if family == "sdxl":
            try:
                out = CompelForSDXL(pipe)(prompt, negative_prompt=negative)
            except AttributeError:  # compel#78 (weighted .and() with a pooled encoder)
                return _pieces_reference(pipe, family, prompt, negative)
            return out.embeds, out.negative_embeds, out.pooled_embeds, out.negative_pooled_embeds
        if family == "sdxl-refiner":
            c = _compel_for(pipe, 2, pooled=True)
            try:
                (e, p), (ne, np_) = c(prompt), c(negative)
            except AttributeError:  # compel#78
                return _pieces_reference(pipe, family, prompt, negative)
            e, ne = c.pad_conditioning_tensors_to_same_length([e, ne])
            return e, ne, p, np_
        out = CompelForSD(pipe)(prompt, negative_prompt=negative)
        return out.embeds, out.negative_embeds, None, None


def assert_matches_compel(handle, prompt, negative):
    cond = tl_prompt.encode(handle, prompt, negative)
    ref = compel_reference(handle.pipe, handle.family, prompt, negative)
    got = (cond.embeds, cond.negative_embeds, cond.pooled, cond.negative_pooled)
    for name, a, b in zip(("embeds", "negative_embeds", "pooled", "negative_pooled"), got, ref):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (name, (a - b).abs().max().item())
    assert cond.embeds.shape[1] % 77 == 0 and cond.embeds.shape == cond.negative_embeds.shape
    return cond


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner", "sd15"])
@pytest.mark.parametrize("prompt,negative", CASES, ids=CASE_IDS)
def test_matches_compel(request, family, prompt, negative):
    handle = request.getfixturevalue(FAMILY_FIXTURES[family])
    cond = assert_matches_compel(handle, prompt, negative)
    assert cond.family == family and cond.prompt == prompt and cond.negative == negative


@pytest.mark.parametrize("prompt,negative", IP2P_CASES)
def test_matches_compel_ip2p(tiny_ip2p, prompt, negative):
    assert_matches_compel(tiny_ip2p, prompt, negative)


def test_shapes_per_family(tiny_sdxl, tiny_refiner, tiny_sd15):
    from tunelab.core import tiny

    assert len(tiny_sdxl.pipe.tokenizer.tokenize(tl_prompt.clean_text(LONG))) > 150
    long = tl_prompt.encode(tiny_sdxl, LONG, "wrong")  # never truncated
    assert long.embeds.shape == (1, LONG_CHUNKS * 77, tiny.TE1_WIDTH + tiny.TE2_WIDTH)
    assert long.pooled.shape == (1, tiny.TE2_WIDTH)
    ref = tl_prompt.encode(tiny_refiner, "a cat", "")
    assert ref.embeds.shape == (1, 77, tiny.TE2_WIDTH) and ref.pooled.shape == (1, tiny.TE2_WIDTH)
    sd = tl_prompt.encode(tiny_sd15, "a cat", LONG)
    assert sd.embeds.shape == sd.negative_embeds.shape == (1, LONG_CHUNKS * 77, tiny.TE1_WIDTH) and sd.pooled is None


def test_comparison_can_fail(tiny_sdxl):
    """The exactness check notices a different prompt, a different encoder output and a different pooled text."""
    a = tl_prompt.encode(tiny_sdxl, "a photo of a cat", "wrong")
    ref = compel_reference(tiny_sdxl.pipe, "sdxl", "a photo of a dog", "wrong")
    assert not torch.allclose(a.embeds, ref[0], rtol=0, atol=1e-6)
    clean = tl_prompt.encode(tiny_sdxl, EXAMPLE, "wrong", pooled_from="clean")
    ref = compel_reference(tiny_sdxl.pipe, "sdxl", EXAMPLE, "wrong")
    assert torch.equal(clean.embeds, ref[0])
    assert not torch.allclose(clean.pooled, ref[2], rtol=0, atol=1e-6)  # compel pools the raw text (compel#96)


# ---------------------------------------------------------------------------------------------------------------
# the weighting math, checked against the text encoders directly (no compel)


def _hidden(pipe, which, ids, mask=None):
    te = pipe.text_encoder if which == 1 else pipe.text_encoder_2
    with torch.no_grad():
        return te(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]


def _ids(pipe, which, text):
    tok = pipe.tokenizer if which == 1 else pipe.tokenizer_2
    return torch.tensor([tok(text, padding="max_length", max_length=77).input_ids])


def _span(pipe, before, fragment):
    """Token positions of `fragment` after `before` (BOS first); char-level tokens, so fragments tokenize alone."""
    n_before = len(pipe.tokenizer.tokenize(before)) if before else 0
    return slice(1 + n_before, 1 + n_before + len(pipe.tokenizer.tokenize(fragment)))


def test_upweight_math(tiny_sdxl):
    """compel: weighted tokens become empty + (z - empty) * w; every other position is left bit-exact."""
    pipe = tiny_sdxl.pipe
    plain = tl_prompt.encode(tiny_sdxl, "a cat on a mat here", "wrong")
    weighted = tl_prompt.encode(tiny_sdxl, "a cat (on a mat)1.3 here", "wrong")
    span = _span(pipe, "a cat", "on a mat")
    others = torch.ones(plain.embeds.shape[1], dtype=torch.bool)
    others[span] = False
    assert torch.equal(weighted.embeds[:, others], plain.embeds[:, others])
    assert torch.equal(weighted.negative_embeds, plain.negative_embeds)
    expected = []
    for which in (1, 2):
        z = _hidden(pipe, which, _ids(pipe, which, "a cat on a mat here"))
        empty = _hidden(pipe, which, _ids(pipe, which, ""))
        expected.append((empty + (z - empty) * 1.3)[:, span])
    expected = torch.cat(expected, dim=-1)
    assert torch.allclose(weighted.embeds[:, span], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(weighted.embeds[:, span], plain.embeds[:, span], rtol=0, atol=1e-3)


def test_downweight_math(tiny_sdxl):
    """compel (MASK mode): blend z with z-with-the-fragment-masked-out, weights [1, tan((1 - w) * pi / 2)]; both
    carry the per-token weighting empty + (z - empty) * w on the fragment's own tokens."""
    pipe = tiny_sdxl.pipe
    plain = tl_prompt.encode(tiny_sdxl, "a cat on a mat here", "wrong")
    weighted = tl_prompt.encode(tiny_sdxl, "a cat (on a mat)0.6 here", "wrong")
    span = _span(pipe, "a cat", "on a mat")
    t = math.tan((1 - 0.6) * math.pi / 2)
    expected = []
    for which in (1, 2):
        ids = _ids(pipe, which, "a cat on a mat here")
        mask = torch.ones_like(ids)
        mask[:, span] = 0
        empty = _hidden(pipe, which, _ids(pipe, which, ""))

        def weighted_span(z):
            z = z.clone()
            z[:, span] = empty[:, span] + (z[:, span] - empty[:, span]) * 0.6
            return z

        z, z_without = _hidden(pipe, which, ids, torch.ones_like(ids)), _hidden(pipe, which, ids, mask)
        expected.append((weighted_span(z) + t * weighted_span(z_without)) / (1 + t))
    assert torch.allclose(weighted.embeds, torch.cat(expected, dim=-1), rtol=0, atol=1e-5)
    # causal attention: positions before the fragment cannot see the mask, so they keep their value
    assert torch.allclose(weighted.embeds[:, :span.start], plain.embeds[:, :span.start], rtol=0, atol=1e-6)
    assert not torch.allclose(weighted.embeds[:, span], plain.embeds[:, span], rtol=0, atol=1e-3)


NEUTRAL = ["a cat (on a mat)1.0 here", "(a cat)1 (on a mat)1.0 (here)1", '("a cat on a mat here").blend(1)',
           "(a cat on a mat here).attend(1)"]


def test_weight_one_equals_plain(tiny_sdxl, tiny_sd15):
    plain_text = "a cat on a mat here"
    for handle in (tiny_sdxl, tiny_sd15):
        plain = tl_prompt.encode(handle, plain_text, "wrong")
        for neutral in NEUTRAL:
            same = tl_prompt.encode(handle, neutral, "wrong", pooled_from="clean")
            assert torch.equal(same.embeds, plain.embeds) and torch.equal(same.negative_embeds, plain.negative_embeds)
            if handle.family == "sdxl":  # clean pooled is the plain prompt's ...
                assert torch.equal(same.pooled, plain.pooled), neutral
                assert torch.equal(same.negative_pooled, plain.negative_pooled)
    # ... while raw pooled sees the syntax characters (compel's behaviour, compel#96)
    raw, plain = tl_prompt.encode(tiny_sdxl, NEUTRAL[0], "wrong"), tl_prompt.encode(tiny_sdxl, plain_text, "wrong")
    assert not torch.allclose(raw.pooled, plain.pooled, rtol=0, atol=1e-6)


def test_clean_pooled_blend(tiny_sdxl):
    """clean pooled of a blend = the blend of the parts' pooled vectors, with the normalized blend weights."""
    blend = tl_prompt.encode(tiny_sdxl, '("a (red)++ car", "a blue car").blend(3, 1)', "", pooled_from="clean")
    red = tl_prompt.encode(tiny_sdxl, "a red car", "", pooled_from="clean").pooled
    blue = tl_prompt.encode(tiny_sdxl, "a blue car", "", pooled_from="clean").pooled
    assert torch.allclose(blend.pooled, 0.75 * red + 0.25 * blue, rtol=0, atol=1e-6)
    assert tl_prompt.clean_text(EXAMPLE) == ("hyperrealistic death metal album cover featuring edgy moody realistic "
                                             "human Super Mario, edgy and moody")


# ---------------------------------------------------------------------------------------------------------------
# bad syntax: a TuneLabError naming the problem and the position


BAD = [  # (prompt, words in the message, 0-based position, what compel alone does with it)
    ("moody (human Super Mario++, edgy", "'(' is never closed", 6, "silent"),
    ("human Super Mario)++", "no matching '('", 17, "silent"),
    ('a "quoted prompt', "quotes", 2, "silent"),
    ("++", "dangling weight operator", 0, "silent"),
    ("moody ++ edgy", "dangling weight operator", 6, "silent"),
    ("(x)1.3.5", "malformed weight '1.3.5'", 3, "silent"),
    ("(x)++-", "mixed weight operators", 3, "silent"),
    ("(x)+1.3", "one weight", 3, "silent"),
    ('("a", "b").blend(', "never closed", 16, "silent"),
    ('("a", "b").blend(1)', "1 weight(s) for 2 prompt(s)", 10, "raises"),
    ('("a", "b", "c").and(1, 0.5)', "2 weight(s) for 3 prompt(s)", 15, "raises"),
    ('("a", "b").blend(1, 0.5) more', "would be dropped", 25, "raises"),
    ('more ("a", "b").and()', "whole prompt", 0, "silent"),
    ('("a", "b").blend(one, two)', "not a number", 17, "raises"),
    ("a cat.swap(dog)", ".swap() is not supported", 5, "silent"),
    ("a (red cat).swap(blue dog) on a mat", ".swap() is not supported", 11, "silent"),
    ("(masterpiece:1.2), a cat", "A1111", 12, "silent"),
    ("withLora(wrong, 1) a cat", "LoRA node", 0, "silent"),
    ("(x).attend(-0.5)", ".attend() takes one weight", 11, "silent"),
]


@pytest.mark.parametrize("bad,problem,position,_", BAD, ids=[b[0] for b in BAD])
def test_bad_syntax(tiny_sdxl, bad, problem, position, _):
    with pytest.raises(TuneLabError) as info:
        tl_prompt.encode(tiny_sdxl, bad, "wrong")
    err = info.value
    assert isinstance(err, tl_prompt.PromptSyntaxError)
    assert err.input_name == "positive" and str(err).startswith("positive: ")
    assert problem in str(err)
    assert err.position == position and f"at position {position + 1}:" in str(err), str(err)


def test_bad_negative_names_the_negative(tiny_sdxl):
    with pytest.raises(TuneLabError, match=r"^negative: .*'\(' is never closed.*at position 1:"):
        tl_prompt.encode(tiny_sdxl, "a cat", "(blurry")


@pytest.mark.parametrize("empty", ["", "   \n", "()", '""'])
def test_empty_positive_refused(tiny_sdxl, empty):
    with pytest.raises(TuneLabError, match="positive: the positive prompt (is empty|has no words)"):
        tl_prompt.encode(tiny_sdxl, empty, "wrong")


def test_compel_alone_misreads_or_gives_no_position():
    """Why the checker exists: compel's parser reads most of these silently as something else (literal text,
    dropped text, an ignored .swap(), an unapplied withLora()), and raises on the rest without a usable position."""
    from compel import Compel

    for bad, _, _, compel_does in BAD:
        if compel_does == "silent":
            Compel.parse_prompt_string(bad)
        else:
            with pytest.raises(Exception):
                Compel.parse_prompt_string(bad)


def test_legal_oddities_accepted():
    for ok in ["C++ code", "-5 degrees", "well-lit room", "(x)1.3.", "photo.jpg", "(at 10:30)", "(16:9)", "a,b",
               r"a \+ b", "(x).5", '("a", "b").blend()', '("a", "b").blend(1, 1, no_normalize)']:
        tl_prompt.check(ok)


# ---------------------------------------------------------------------------------------------------------------
# batching, options, LoRA state


def test_batch_copies(tiny_sdxl, tiny_sd15):
    for handle in (tiny_sdxl, tiny_sd15):
        one = tl_prompt.encode(handle, EXAMPLE, "wrong")
        three = tl_prompt.encode(handle, EXAMPLE, "wrong", batch=3)
        for a, b in [(one.embeds, three.embeds), (one.negative_embeds, three.negative_embeds),
                     (one.pooled, three.pooled), (one.negative_pooled, three.negative_pooled)]:
            if a is None:
                assert b is None
                continue
            assert b.shape == (3,) + tuple(a.shape[1:])
            for row in range(3):
                assert torch.equal(b[row:row + 1], a)
        assert three.batch == 3


@pytest.mark.parametrize("batch", [0, -1, tl_prompt.MAX_BATCH + 1, 2.5, True])
def test_batch_limits(tiny_sdxl, batch):
    with pytest.raises(TuneLabError, match="batch_size"):
        tl_prompt.encode(tiny_sdxl, "a cat", "", batch=batch)


def test_unknown_pooled_from(tiny_sdxl):
    with pytest.raises(TuneLabError, match="pooled_from"):
        tl_prompt.encode(tiny_sdxl, "a cat", "", pooled_from="stripped")


def test_text_encoder_lora_is_applied_and_not_leaked():
    """encode activates the handle's LoRA stack; compel's cached empty-prompt embedding follows it."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    from tunelab.core import adapters, lora, models, tiny

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny.ensure("tiny-sdxl")), local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for te in (pipe.text_encoder, pipe.text_encoder_2):  # peft itself: transformers' add_adapter is gated
            adapters.add(te, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights=False), "te_lora")
    base = models.PipeHandle(pipe=pipe, family="sdxl", source="tiny-sdxl", dtype=torch.float32,
                             device=torch.device("cpu"))
    with_lora = base.with_lora(models.LoraRef(adapter="te_lora", weight=0.8, name="te_lora.safetensors",
                                              sha256="0" * 64))
    text = "a (cat)++ on a (mat)-"
    before = tl_prompt.encode(base, text, "wrong")  # caches compel objects for the base state first
    lora_cond = tl_prompt.encode(with_lora, text, "wrong")
    assert lora_cond.loras == with_lora.loras
    lora.activate(with_lora)
    ref = compel_reference(pipe, "sdxl", text, "wrong")  # fresh compel with the LoRA active
    assert torch.allclose(lora_cond.embeds, ref[0], rtol=0, atol=1e-6)
    assert torch.allclose(lora_cond.pooled, ref[2], rtol=0, atol=1e-6)
    assert not torch.allclose(lora_cond.embeds, before.embeds, rtol=0, atol=1e-3)
    after = tl_prompt.encode(base, text, "wrong")
    assert torch.equal(after.embeds, before.embeds) and torch.equal(after.pooled, before.pooled)


# ---------------------------------------------------------------------------------------------------------------
# nodes


def test_weighted_prompt_node(tiny_sdxl):
    from tunelab.nodes import prompt as node_mod
    from tunelab.nodes.common import COND, PIPE

    cls, display = node_mod.NODES["TuneLabWeightedPrompt"]
    assert display == "TuneLab Weighted Prompt" and cls.RETURN_TYPES == (COND,)
    inputs = cls.INPUT_TYPES()
    required = inputs["required"]
    assert list(required) == ["pipe", "positive", "negative", "batch_size"]
    assert required["pipe"][0] == PIPE
    assert required["positive"][1]["multiline"] and required["positive"][1]["default"] == EXAMPLE
    assert required["negative"][1]["multiline"] and required["negative"][1]["default"] == "wrong"
    assert required["batch_size"][0] == "INT" and required["batch_size"][1]["min"] == 1
    for section in inputs.values():
        for name, (_, opts) in section.items():
            assert opts.get("tooltip"), name
    node = cls()
    (cond,) = getattr(node, cls.FUNCTION)(pipe=tiny_sdxl, positive=EXAMPLE, negative="wrong", batch_size=3)
    assert cond.batch == 3 and cond.pooled.shape[0] == 3
    direct = tl_prompt.encode(tiny_sdxl, EXAMPLE, "wrong")
    assert torch.equal(cond.embeds[1:2], direct.embeds)
    with pytest.raises(TuneLabError, match="positive"):
        getattr(node, cls.FUNCTION)(pipe=tiny_sdxl, positive="", negative="wrong", batch_size=1)


def test_cond_to_native(tiny_sdxl, tiny_refiner, tiny_sd15, tiny_ip2p):
    from tunelab.core import tiny
    from tunelab.nodes import prompt as node_mod

    cls, display = node_mod.NODES["TuneLabCondToNative"]
    assert display == "TuneLab Conditioning To Native" and cls.RETURN_TYPES == ("CONDITIONING", "CONDITIONING")
    assert all(opts.get("tooltip") for _, opts in cls.INPUT_TYPES()["required"].values())
    convert = getattr(cls(), cls.FUNCTION)

    cond = tl_prompt.encode(tiny_sdxl, LONG, "wrong", batch=2)
    pos, neg = convert(cond=cond, width=832, height=1216)
    for native, embeds, pooled in [(pos, cond.embeds, cond.pooled), (neg, cond.negative_embeds, cond.negative_pooled)]:
        assert len(native) == 1 and len(native[0]) == 2
        tensor, extra = native[0]
        assert tensor.shape == (2, LONG_CHUNKS * 77, tiny.TE1_WIDTH + tiny.TE2_WIDTH) and tensor.device.type == "cpu"
        assert torch.equal(tensor, embeds)
        assert set(extra) == {"pooled_output", "width", "height", "crop_w", "crop_h", "target_width", "target_height"}
        assert torch.equal(extra["pooled_output"], pooled) and extra["pooled_output"].shape == (2, tiny.TE2_WIDTH)
        assert (extra["width"], extra["height"], extra["crop_w"], extra["target_width"]) == (832, 1216, 0, 1024)

    pos, neg = convert(cond=tl_prompt.encode(tiny_refiner, "a cat", "wrong"))
    assert pos[0][0].shape == (1, 77, tiny.TE2_WIDTH)
    assert set(pos[0][1]) == {"pooled_output", "aesthetic_score", "width", "height"}
    assert (pos[0][1]["aesthetic_score"], neg[0][1]["aesthetic_score"]) == (6.0, 2.5)

    for handle in (tiny_sd15, tiny_ip2p):
        pos, neg = convert(cond=tl_prompt.encode(handle, "a cat", ""))
        assert pos[0][0].shape == neg[0][0].shape == (1, 77, tiny.TE1_WIDTH)
        assert pos[0][1] == {} and neg[0][1] == {}
