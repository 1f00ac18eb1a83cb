"""Syntax compel would silently read as plain text (or as another weight than it looks) is refused with how to write
it; compel's own parser is the judge of what each spelling means."""
import contextlib
import logging

import pytest

from tunelab.core import prompt as tl_prompt
from tunelab.core.errors import TuneLabError


def compel_reads(text):
    """[(text, weight)] as compel's parser reads a prompt."""
    from compel.prompt_parser import PromptParser

    return [(f.text, round(f.weight, 4)) for f in PromptParser().parse_conjunction(text).prompts[0].children]


# (prompt, what compel makes of it, words in our message, 0-based position)
REFUSED = [
    ("sunset+!", [("sunset+!", 1.0)], "Write sunset+ ! to weight 'sunset', or sunset +! to keep", 6),
    ("f/1.8+ lens", [("f/1.8+ lens", 1.0)], "write (f/1.8)+", 5),
    ("a (f/1.8+ lens)", [("a f/1 .", 1.0), ("8", 1.1), ("lens", 1.0)], "weights only '8'", 8),
    ("word++y", [("word", 1.21), ("y", 1.0)], "put a space after the weight: word++ y", 4),
    ("foo(bar) baz", [("foo(bar) baz", 1.0)], "parentheses in 'foo(bar)'", 3),
    ("a (b=c) d", [("a (b=c) d", 1.0)], "parentheses in '(b=c)'", 2),
    ("x.y+ z", [("x.y+ z", 1.0)], "write (x.y)+", 3),
]


@pytest.mark.parametrize("text,compel,words,position", REFUSED, ids=[r[0] for r in REFUSED])
def test_silent_literals_refused(text, compel, words, position):
    assert compel_reads(text) == compel  # the judge: what compel alone would encode
    with pytest.raises(tl_prompt.PromptSyntaxError) as e:
        tl_prompt.check(text)
    assert words in str(e.value) and e.value.position == position, str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fix,compel", [
    ("sunset+ !", [("sunset", 1.1), ("!", 1.0)]),  # weighted, as the message says
    ("sunset +!", [("sunset +!", 1.0)]),  # the '+' kept as text
    ("(f/1.8)+ lens", [("f/1 . 8", 1.1), ("lens", 1.0)]),  # all of f/1.8 weighted (CLIP splits '.' anyway)
    ("word++ y", [("word", 1.21), ("y", 1.0)]),
    ("foo (bar) baz", [("foo bar baz", 1.0)]),
])
def test_the_suggested_spellings_mean_what_they_say(fix, compel):
    assert compel_reads(fix) == compel
    tl_prompt.check(fix)


def test_cpp_is_a_weight_and_stays_legal():
    """compel reads `C++ code` as 'C' weighted x1.21; that is valid syntax, so it is accepted (the README says how
    compel reads it). A single sign inside a word stays text: x-ray, a+b."""
    assert compel_reads("C++ code") == [("C", 1.21), ("code", 1.0)]
    for ok in ("C++ code", "x-ray", "a+b", "rock+roll", "well-lit room", "e-mail+"):
        tl_prompt.check(ok)
    assert compel_reads("e-mail+") == [("e-mail", 1.1)]


def test_positive_and_negative_checked_together():
    with pytest.raises(TuneLabError) as e:
        tl_prompt.check_prompts("a fox", ["", "wrong", "(blurry"])
    assert e.value.input_name == "negative"
    with pytest.raises(TuneLabError) as e:
        tl_prompt.check_prompts("(a fox", "(blurry", positive_name="prompt")
    assert e.value.input_name == "prompt"  # the positive first
    assert len(tl_prompt.check_prompts("a fox", ["wrong", "wrong"])) == 2  # each distinct negative once


@contextlib.contextmanager
def _transformers_warnings():
    """The messages transformers logs at WARNING and above, read on its own logger: transformers 4 does not
    propagate to the root logger (where caplog listens), transformers 5 does."""
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    root = logging.getLogger("transformers")
    handler = Keep(logging.WARNING)
    root.addHandler(handler)
    try:
        yield seen
    finally:
        root.removeHandler(handler)


def test_long_prompt_warning_quiet_for_our_calls_only(tiny_sdxl):
    long = ", ".join(["a very long prompt about many things"] * 20)
    tok = tiny_sdxl.pipe.tokenizer
    tok.deprecation_warnings.pop("sequence-length-is-longer-than-the-specified-maximum", None)  # other tests' calls
    with _transformers_warnings() as seen:
        tl_prompt.encode(tiny_sdxl, long, "wrong")
        tl_prompt.encode(tiny_sdxl, long, "wrong", pooled_from="clean")
    assert not [m for m in seen if "sequence length is longer" in m]
    assert "sequence-length-is-longer-than-the-specified-maximum" not in tok.deprecation_warnings
    with _transformers_warnings() as seen:
        tok(long)  # someone else's call still warns
    assert [m for m in seen if "sequence length is longer" in m]
    tok.deprecation_warnings.pop("sequence-length-is-longer-than-the-specified-maximum", None)
