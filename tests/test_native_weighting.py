"""compel's math as one function over an "encode these token windows" callback (core/weighting.py), offline:
the diffusers callback against compel where test_prompt.py does not reach (CompelForSDXL's main/style split, whose
encoders get different lengths), what the callback is asked for, and the ComfyUI-side window scheduling of host.py
with a stand-in CLIP."""
import pytest
import torch

from tunelab import host
from tunelab.core import prompt as tl_prompt
from tunelab.core import weighting
from tunelab.core.errors import TuneLabError

LONG = ("An old stone castle on a hill under a stormy sky. Ravens circle the tower. A road winds up to the gate, "
        "lit by (flickering torches)1.3, then (more)-")


@pytest.mark.parametrize("pos_g,pos_l,neg_g,neg_l", [
    ("a (red)++ car on a bridge", "a photo of a car", "wrong", "(blurry)0.5"),
    ("a cat+", LONG, "(ugly)0.6", "wrong"),  # CLIP-L two chunks, CLIP-G one: padded with "" across encoders
    (LONG, "a cat", "", "blurry"),
    ('("a red car", "a blue car").blend(1, 0.5)', '("part one", "part two").and(1, 0.5)', "x", "y"),
])
def test_split_prompts_equal_compel_main_and_style(tiny_sdxl, encoders_of, pos_g, pos_l, neg_g, neg_l):
    from compel import CompelForSDXL

    encoders = encoders_of(tiny_sdxl)
    got = tl_prompt.encode_with(encoders, pos_g, neg_g, split={"te1": (pos_l, neg_l)})
    try:
        with torch.no_grad():
            out = CompelForSDXL(tiny_sdxl.pipe)(pos_l, style_prompt=pos_g, negative_prompt=neg_l,
                                                negative_style_prompt=neg_g)
    except AttributeError:  # compel#78: a weighted .and() on CLIP-G; the plain case is covered elsewhere
        pytest.skip("compel crashes on this form (compel#78)")
    except RuntimeError as e:  # compel 2.2 pads a shorter CLIP-G side with a batch of one, then cannot concatenate
        if "Sizes of tensors must match" not in str(e) or _compel_version() >= (2, 3):
            raise
        pytest.skip(f"compel {_compel_version()} cannot pad a shorter style prompt; later compel can")
    ref = (out.embeds, out.negative_embeds, out.pooled_embeds, out.negative_pooled_embeds)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()


def _compel_version() -> tuple:
    from importlib.metadata import version

    return tuple(int(p) for p in version("compel").split(".")[:2])


class Recorder:
    """Wraps a callback and keeps what it was asked for."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, requests, pooled):
        self.calls.append(({k: list(v) for k, v in requests.items()}, {k: list(v) for k, v in pooled.items()}))
        return self.inner(requests, pooled)


def _recorded(handle):
    enc = tl_prompt._encoders_for(handle)
    rec = Recorder(enc.encode)
    return tl_prompt.TextEncoders(enc.vocabularies, rec, enc.order, enc.pooled_key), rec


def test_plain_pair_asks_for_two_windows_and_no_empty_one(tiny_sdxl):
    encoders, rec = _recorded(tiny_sdxl)
    tl_prompt.encode_with(encoders, "a photo of a cat", "wrong")
    (requests, pooled), = rec.calls
    assert {k: len(v) for k, v in requests.items()} == {"te1": 2, "te2": 2}
    assert all(w.mask == (1,) * 77 for ws in requests.values() for w in ws)
    assert len(pooled["te2"]) == 2 and all(w.mask is None for w in pooled["te2"])


def test_downweight_asks_for_masked_windows_only_where_the_mask_changes(tiny_sdxl):
    encoders, rec = _recorded(tiny_sdxl)
    text = LONG.replace("(more)-", "more") + " and (a faint moon)0.5 at the end"  # two chunks, fragment in chunk 2
    tl_prompt.encode_with(encoders, text, "")
    (requests, _), = rec.calls
    windows = requests["te1"]
    masked = [w for w in windows if w.mask is not None and not all(w.mask)]
    plain = [w for w in windows if w.mask is not None and all(w.mask)]
    empty = [w for w in windows if w.mask is None]
    assert len(masked) == 1 and len(plain) == 3 and len(empty) == 1  # 2 chunks + "", one masked, z_empty
    assert masked[0].mask[0] == masked[0].mask[76] == 1 and masked[0].mask.count(0) == len("afaintmoon")  # char tokens, no spaces
    assert empty[0] == weighting.empty_window(encoders.vocabularies["te1"], masked=False)


def test_every_encoder_needs_as_many_prompts(tiny_sdxl, encoders_of):
    encoders = encoders_of(tiny_sdxl)
    conj = tl_prompt.check("a cat")
    with pytest.raises(TuneLabError, match="same number of prompts"):
        weighting.encode_conjunctions({"te1": [conj], "te2": [conj, conj]}, encoders.vocabularies, encoders.encode)


def test_pooled_window_truncates_like_compel(tiny_sdxl):
    vocab = tl_prompt.vocabulary(tiny_sdxl.pipe.tokenizer_2)
    w = weighting.pooled_window(vocab, LONG)
    tok = tiny_sdxl.pipe.tokenizer_2
    assert list(w.ids) == tok(LONG, truncation=True, padding="max_length", max_length=77).input_ids
    assert w.mask is None


# ---------------------------------------------------------------------------------------------------------------
# host.py's scheduling of windows over encode_from_tokens, with a stand-in for ComfyUI's CLIP


class FakeTokenizer:
    class Part:
        def __init__(self, size):
            self.embedding_size = size

    def __init__(self):
        self.clip_l, self.clip_g = self.Part(2), self.Part(3)


class FakeClip:
    """encode_from_tokens as ComfyUI's SDXL CLIP shapes it: every window of a key in one batch, CLIP-L and CLIP-G
    side by side, the pooled vector of CLIP-G's first window. Values are a function of the window's ids."""

    def __init__(self):
        self.tokenizer, self.calls = FakeTokenizer(), []

    @staticmethod
    def z(ids, width):
        ids = torch.tensor(ids, dtype=torch.float32)
        return torch.stack([ids * (j + 1) + j for j in range(width)], dim=-1)

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.calls.append({k: [[t for t, _ in w] for w in ws] for k, ws in tokens.items()})
        rows = []
        for wl, wg in zip(tokens["l"], tokens["g"]):
            rows.append(torch.cat([self.z([t for t, _ in wl], 2), self.z([t for t, _ in wg], 3)], -1))
        cond = torch.cat(rows).reshape(1, -1, 5)
        pooled = torch.tensor([[float(sum(t for t, _ in tokens["g"][0]))] * 4])
        return cond, pooled


def _window(n):
    return weighting.Window(tuple([n] * 77), (1,) * 77)


def test_encode_plain_gives_each_pooled_window_its_own_call():
    clip = FakeClip()
    windows = {"l": [_window(1), _window(2), _window(3)], "g": [_window(4), _window(5)]}
    pooled = [weighting.Window(_window(5).ids, None), weighting.Window(tuple([9] * 77), None)]
    empty = {"l": _window(0), "g": _window(0)}
    z, vectors = host._encode_plain(clip, ("l", "g"), "g", windows, pooled, empty)
    assert len(clip.calls) == 2
    assert [c["g"][0][0] for c in clip.calls] == [5, 9]  # each pooled window opens its call
    assert all(len(c["l"]) == len(c["g"]) for c in clip.calls)  # keys topped up to the same count
    for k, width in (("l", 2), ("g", 3)):
        for i, w in enumerate(windows[k]):
            assert torch.equal(z[k][i:i + 1], FakeClip.z(list(w.ids), width)[None])
    assert [float(v[0, 0]) for v in vectors] == [5.0 * 77, 9.0 * 77]


def test_encode_plain_without_pooled_is_one_call():
    clip = FakeClip()
    windows = {"l": [_window(1)], "g": [_window(2), _window(3)]}
    z, vectors = host._encode_plain(clip, ("l", "g"), None, windows, [], {"l": _window(0), "g": _window(0)})
    assert len(clip.calls) == 1 and vectors == []
    assert torch.equal(z["g"][1:2], FakeClip.z([3] * 77, 3)[None])


def test_native_services_need_comfyui_outside_it():
    assert host.sampler_names()[:3] == ["euler", "euler_cfg_pp", "euler_ancestral"]
    assert "normal" in host.scheduler_names()
    with pytest.raises(TuneLabError, match="needs ComfyUI"):
        host.clip_family(object())


def test_plain_text_skips_the_grammar_with_compel_s_own_result():
    """core/prompt._parse reads text without syntax characters without pyparsing; compel's parser agrees."""
    import random

    from compel.prompt_parser import PromptParser

    parser = PromptParser()
    alphabet = list("abcxyz0123456789") + [" "] * 6 + list(",,..!?;:'\n\t#%*/|_~[]{}<>@&$^`") + ["ü", "日", "🙂"]
    words = ["blend", "and", "swap", "withLora", "attend", "x.blend", ".and", "e.g.", "1.5", ".5", ",,", " ,", "AND"]
    rng = random.Random(0)
    texts = ["a photo of a cat", "blurry, low quality", "a,b,,c", "  spaced   out  ", "end.", "10:30, 16:9"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(150)]
    texts += [" ".join(rng.choice(words + ["cat"]) for _ in range(rng.randint(1, 12))) for _ in range(50)]
    for text in texts:
        if not text.strip():
            continue
        assert not tl_prompt._SYNTAX_CHARS.intersection(text)
        assert repr(tl_prompt._parse(text)) == repr(parser.parse_conjunction(text)), repr(text)
    assert repr(tl_prompt._parse("a (cat)+ x")) == repr(parser.parse_conjunction("a (cat)+ x"))  # grammar path
