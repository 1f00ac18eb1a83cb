"""Weighted prompts in compel syntax -> `Conditioning` (the TUNELAB_COND value).

`encode` is the one encoding function: the nodes, the CLI, the synthesis jobs and the trainers all call it, so a prompt
means the same thing everywhere. The weighting itself is compel's own (CompelForSDXL for SDXL base, a single-encoder
Compel on TE2 for the refiner, CompelForSD for SD1.x/SD2.x/InstructPix2Pix); this module adds what compel leaves out:

- a syntax check with positions, because compel's parser is lenient: an unclosed `(`, a dangling `++`, `(x)1.3.5`
  or text after `.and()` are silently read as literal text or dropped (`.blend()` with no weights is compel's
  "equal weights" and stays legal);
- long prompts chunked (never truncated), positive and negative padded to the same length;
- batch copies made along dim 0 (compel's own batching trips over `num_images_per_prompt`, compel#37);
- `.and()` with weights on the pooled (SDXL) encoders, where compel crashes (compel#78), computed from compel's
  own parts with the same math;
- the Compel objects cached per pipe and per text-encoder state (LoRA stack, device, dtype).

Pooled embeddings (SDXL): `pooled_from="raw"` is compel's behaviour, the pooled vector of TE2 run on the raw prompt
string *including* its syntax characters (compel#96); `"clean"` runs TE2 on the prompt with the syntax stripped
(`clean_text`), and a `.blend()` blends the parts' pooled vectors with the blend's weights. Raw is the default because
it reproduces compel (and the published notebooks) exactly.
"""
from __future__ import annotations

import contextlib
import functools
import re
import threading
import weakref
from typing import Any

from . import lora
from .conditioning import Conditioning
from .errors import TuneLabError

POOLED_FROM = ("raw", "clean")
MAX_BATCH = 64

# compel's escapable characters (prompt_parser.build_parser_syntax: syntactic_symbols)
_ESCAPABLE = frozenset('()",.+-=')
_SYNTAX_CHARS = '()",.+-='
# a sign run that compel left in the text although it looks like a weight: right after a character (not a space, a
# backslash or another sign) and before a space, the end or punctuation ('sunset+!', 'f/1.8+ lens')
_LITERAL_WEIGHT = re.compile(r"(?<=[^\s\\+\-])(\++|-+)(?=\s|$|[^\w\s+\-])")
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_SIGNED_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_OPERATOR = re.compile(r"\.([A-Za-z_]\w*)")
_LIST_OPERATORS = ("blend", "and", "add")
# A1111 weights, `(word:1.2)`; the lookbehind keeps times and ratios such as `(at 10:30)` and `(16:9)` legal.
_A1111 = re.compile(r"(?<=[^\d\s:]):\s*(?:\d+(?:\.\d*)?|\.\d+)\s*\)")
_LORA_CALL = re.compile(r"\b(?:withLora|useLora)\s*\(")


class PromptSyntaxError(TuneLabError):
    """A prompt compel would misread. `position` is the 0-based index of the offending character (None: the
    prompt as a whole, e.g. empty); the message shows it 1-based with an excerpt."""

    def __init__(self, problem: str, text: str, position: int | None, *, input_name: str):
        self.problem = problem
        self.position = position
        where = "" if position is None else f" (at position {position + 1}: \"{_excerpt(text, position)}\")"
        super().__init__(problem + where, input_name=input_name)


def _last_syntax(word: str) -> int:
    """Index of the last unescaped '.' or '=' in a word (-1: none); compel's plain words end there."""
    last, k = -1, 0
    while k < len(word):
        if word[k] == "\\" and k + 1 < len(word) and word[k + 1] in _ESCAPABLE:
            k += 2
            continue
        if word[k] in ".=":
            last = k
        k += 1
    return last


def _excerpt(text: str, pos: int, width: int = 24) -> str:
    a, b = max(0, pos - width), min(len(text), pos + width)
    snippet = ("…" if a else "") + text[a:pos] + "▶" + text[pos:b] + ("…" if b < len(text) else "")
    return snippet.replace("\n", " ")


# ---------------------------------------------------------------------------------------------------------------
# parsing and checking

_PARSER = None
_PARSER_LOCK = threading.Lock()


@functools.lru_cache(maxsize=512)
def _parse(text: str):
    """compel's own parser, one grammar kept for the process (compel builds a fresh one per call, ~2 ms)."""
    global _PARSER
    from compel.prompt_parser import PromptParser

    with _PARSER_LOCK:
        if _PARSER is None:
            _PARSER = PromptParser()
        return _PARSER.parse_conjunction(text)


def _original_position(text: str, loc: int) -> int:
    # compel's parse_conjunction inserts a space after every comma that is followed by a non-space character;
    # map a location in that rewritten string back to the user's string.
    shift = 0
    for m in re.finditer(r",(?=\S)", text):
        if m.start() + 1 + shift >= loc:
            break
        shift += 1
    return max(0, min(len(text) - 1, loc - shift)) if text else 0


class _Checker:
    """One pass over the raw prompt: brackets, quotes and operators, each error with its position."""

    def __init__(self, text: str, input_name: str):
        self.text = text
        self.input_name = input_name
        self.stack: list[list] = []  # [char, position, top-level comma count]
        self.last = None  # what ends right before the cursor: "word", "group", "weighted" or None
        self.list_op = None  # (name, position of the dot, part count) for a whole-prompt .blend()/.and()

    def fail(self, problem: str, pos: int):
        raise PromptSyntaxError(problem, self.text, pos, input_name=self.input_name)

    def run(self) -> None:
        text, n, i = self.text, len(self.text), 0
        m = _LORA_CALL.search(text)
        if m:
            self.fail("withLora()/useLora() in the prompt is not applied by TuneLab; load the LoRA with the "
                      "TuneLab LoRA node instead", m.start())
        m = _A1111.search(text)
        if m:
            self.fail("'(word:1.2)' is A1111 syntax, which compel does not read (it would encode the ':1.2' as "
                      "text); write (word)1.2", m.start())
        while i < n:
            ch = text[i]
            if ch == "\\" and i + 1 < n and text[i + 1] in _ESCAPABLE:
                i += 2
                self.last = "word"
            elif ch == '"':
                if self.stack and self.stack[-1][0] == '"':
                    i = self.after_group(self.stack.pop(), i + 1)
                else:
                    self.stack.append(['"', i, 0])
                    self.last = None
                    i += 1
            elif ch == "(":
                self.stack.append(["(", i, 0])
                self.last = None
                i += 1
            elif ch == ")":
                if not self.stack:
                    self.fail("unbalanced parentheses: ')' has no matching '('; escape a literal one as \\)", i)
                if self.stack[-1][0] == '"':
                    self.fail(f"unbalanced parentheses: ')' inside the quoted text opened at position "
                              f"{self.stack[-1][1] + 1} has no matching '(' there; escape a literal one as \\)", i)
                i = self.after_group(self.stack.pop(), i + 1)
            elif ch in "+-":
                i = self.weight_operator(i)
            elif ch == "." and self.last in ("word", "group") and _OPERATOR.match(text, i):
                i = self.operator(i, None)
            else:
                if ch == "," and self.stack and self.stack[-1][0] == "(":
                    self.stack[-1][2] += 1
                self.last = None if (ch.isspace() or ch == ",") else "word"
                i += 1
        if self.stack:
            kind, pos, _ = self.stack[-1]
            what = "quotes: '\"'" if kind == '"' else "parentheses: '('"
            self.fail(f"unbalanced {what} is never closed", pos)

    def weight_operator(self, i: int) -> int:
        text, n = self.text, len(self.text)
        j = i
        while j < n and text[j] in "+-":
            j += 1
        run = text[i:j]
        if self.last == "word":
            return self.word_weight(i, j)
        if self.last not in ("word", "group"):
            if j == n or text[j].isspace() or text[j] in '),"':
                self.fail(f"dangling weight operator '{run}': there is no word or (group) directly before it; "
                          f"write word{run} or (some words){run}, or attach it to the next word ({run}word) to keep "
                          "it as text", i)
            self.last = "word"  # '-5' or '+y': compel reads these as text
            return j
        if len(set(run)) > 1:
            self.fail(f"mixed weight operators '{run}': use only + or only -", i)
        if self.last == "group" and _NUMBER.match(text, j):  # '(x)+1.3': compel weights by '+', reads '1.3' as text
            self.fail("a group takes one weight: a number or a run of + or -, not both; write (words)++ or "
                      "(words)1.2", i)
        self.last = "weighted"
        return j

    def word_weight(self, i: int, j: int) -> int:
        """A run of + or - right after a plain word (compel's `word+`). compel's grammar decides what it is, and
        several spellings that look like a weight are read as something else: refuse those, saying how to write
        what was meant. (A single sign before a letter is a hyphen or a plus inside a word: `x-ray`, `a+b`.)"""
        text, n = self.text, len(self.text)
        run, nxt = text[i:j], (text[j] if j < n else "")
        start = i
        while start > 0 and not text[start - 1].isspace() and text[start - 1] not in '(",':
            start -= 1
        word = text[start:i]
        if len(run) == 1 and nxt and not nxt.isspace() and nxt not in _SYNTAX_CHARS:
            if nxt.isalnum() or nxt == "_":
                self.last = "word"  # part of the word, as compel reads it
                return j
            self.fail(f"compel reads '{word}{run}{nxt}' as plain text, not as a weight: a {run} only weights "
                      f"when a space, a comma or the end follows it. Write {word}{run} {nxt} to weight "
                      f"'{word}', or {word} {run}{nxt} to keep the '{run}' as text", i)
        if len(run) > 1 and (nxt.isalnum() or nxt == "_"):
            end = j
            while end < n and (text[end].isalnum() or text[end] == "_"):
                end += 1
            rest = text[j:end]
            self.fail(f"compel weights '{word}' and reads '{rest}' as a new word ('{word}{run}{rest}' is split in "
                      f"two); put a space after the weight: {word}{run} {rest}", i)
        cut = _last_syntax(word)
        if cut >= 0:
            head = word[cut + 1:]
            fix = ("write it without the '=' (a group holding '=' is plain text too)" if word[cut] == "=" else
                   f"write ({word}){run}")
            if not self.stack or word[cut] == "=":  # '=' makes the whole group plain text
                self.fail(f"compel reads '{word}{run}' as plain text, not as a weight: a + or - after a word that "
                          f"holds '{word[cut]}' is not syntax. To weight it {fix}; to keep it as text leave out the "
                          f"'{run}'", i)
            self.fail(f"compel weights only '{head}' here, not '{word}' (a + or - after a plain word stops at "
                      f"'{word[cut]}'); to weight all of it {fix}", i)
        if len(set(run)) > 1:
            self.fail(f"mixed weight operators '{run}': use only + or only -", i)
        self.last = "weighted"
        return j

    def after_group(self, opener: list, i: int) -> int:
        text, n = self.text, len(self.text)
        self.last = "group"
        if i < n and (text[i].isdigit() or (text[i] == "." and i + 1 < n and text[i + 1].isdigit())):
            j = _NUMBER.match(text, i).end()
            if j < n and text[j] == "." and j + 1 < n and text[j + 1].isdigit():
                end = _NUMBER.match(text, j + 1).end()
                self.fail(f"malformed weight '{text[i:end]}': a weight is one number such as 1.3", i)
            if j < n and text[j] in "+-":
                self.fail("a group takes one weight: a number or a run of + or -, not both; write (words)++ or "
                          "(words)1.2", j)
            self.last = "weighted"
            return j
        if i < n and text[i] == "." and _OPERATOR.match(text, i):
            return self.operator(i, opener)
        return i

    def operator(self, dot: int, opener) -> int:
        """`.name(...)` after a word (opener None) or a group; returns the index after it."""
        text, n = self.text, len(self.text)
        m = _OPERATOR.match(text, dot)
        name, paren = m.group(1), m.end()
        known = name in _LIST_OPERATORS + ("attend", "swap")
        if name == "swap":
            self.fail(".swap() is not supported: it is prompt-to-prompt attention control, which compel ignores "
                      "in plain conditioning (only the original words would be encoded); write the prompt you "
                      "want instead", dot)
        if paren >= n or text[paren] != "(":
            if known and opener is not None:
                self.fail(f"'.{name}' needs its weights in parentheses, e.g. .{name}(1, 0.5)", dot)
            self.last = "word"  # e.g. 'photo.jpg'
            return paren
        if not known:
            if opener is None:
                self.last = "word"  # 'file.name(1)' after a plain word is text to compel
                return paren
            self.fail(f"unknown operator '.{name}()'; compel knows .blend(), .and() and .attend()", dot)
        close = text.find(")", paren + 1)
        if close < 0:
            self.fail(f"unbalanced parentheses: '(' of .{name}( is never closed", paren)
        args = text[paren + 1:close]
        bad = re.search(r'[("]', args)
        if bad:
            self.fail(f"unexpected '{bad.group()}' in the .{name}() weights", paren + 1 + bad.start())
        items = [a.strip() for a in args.split(",")] if args.strip() else []
        if name == "attend":
            if len(items) != 1 or not (re.fullmatch(r"\++|-+", items[0]) or _NUMBER.fullmatch(items[0])):
                self.fail(".attend() takes one weight >= 0 (a number, or a run of + or -)", paren + 1)
            self.last = "weighted"
            return close + 1
        # .blend() / .and() / .add(): a parenthesized list of prompts that is the whole prompt
        example = f'("a red car", "a blue car").{name}(1, 0.5)'
        if opener is None or opener[0] != "(":
            self.fail(f".{name}() needs a parenthesized list of prompts before it, e.g. {example}", dot)
        if self.stack:
            self.fail(f".{name}() must take the whole prompt, but it sits inside the '(' at position "
                      f"{self.stack[0][1] + 1}; write e.g. {example}", dot)
        before = text[:opener[1]]
        if before.strip():
            self.fail(f"text before .{name}() would be garbled: .{name}() must take the whole prompt, e.g. "
                      f"{example}", len(before) - len(before.lstrip()))
        rest = text[close + 1:]
        if rest.strip():
            self.fail(f"text after .{name}() would be dropped: .{name}() must end the prompt",
                      close + 1 + len(rest) - len(rest.lstrip()))
        normalize = True
        if name == "blend" and items and items[-1] == "no_normalize":
            normalize, items = False, items[:-1]
        for item in items:
            if not _SIGNED_NUMBER.fullmatch(item):
                self.fail(f"the .{name}() weight '{item}' is not a number", paren + 1 + args.find(item))
        parts = opener[2] + 1
        if items and len(items) != parts:
            self.fail(f".{name}() has {len(items)} weight(s) for {parts} prompt(s); give one weight per prompt", dot)
        if name == "blend" and normalize and items and sum(float(w) for w in items) == 0:
            self.fail(".blend() weights sum to 0, so they cannot be normalized; change a weight or add "
                      "no_normalize", paren + 1)
        self.list_op = (name, dot, parts)
        self.last = "weighted"
        return close + 1


def check(prompt: str, *, input_name: str = "positive", required: bool = True):
    """Check `prompt` and return compel's parse of it (a `Conjunction`).

    Raises `PromptSyntaxError` (a `TuneLabError`) naming the problem and its position for syntax compel would
    silently misread, `.swap()`, `withLora()`, and an empty prompt when `required`.
    """
    from compel.prompt_parser import Blend, FlattenedPrompt, PromptParser

    text = "" if prompt is None else str(prompt)
    if not text.strip():
        if required:
            raise PromptSyntaxError(f"the {_what(input_name)} is empty; write what the image should show",
                                    text, None, input_name=input_name)
        return _parse("")
    checker = _Checker(text, input_name)
    checker.run()
    try:
        conj = _parse(text)
    except PromptParser.ParsingException as e:
        checker.fail(f"compel cannot read this prompt: {e}", checker.list_op[1] if checker.list_op else 0)
    except ValueError as e:
        checker.fail(f"compel cannot read this prompt: {e}", checker.list_op[1] if checker.list_op else 0)
    except Exception as e:  # pyparsing.ParseException carries the location in compel's rewritten string
        loc = getattr(e, "loc", None)
        if loc is None:
            raise
        checker.fail(f"compel cannot read this prompt: {getattr(e, 'msg', e)}", _original_position(text, loc))

    if checker.list_op:  # the checker saw a whole-prompt .blend()/.and(); compel must have read it as one
        name, dot, parts = checker.list_op
        if name == "blend":
            ok = (len(conj.prompts) == 1 and isinstance(conj.prompts[0], Blend)
                  and len(conj.prompts[0].prompts) == parts)
        else:
            ok = len(conj.prompts) == parts and all(isinstance(p, FlattenedPrompt) for p in conj.prompts)
        if not ok:
            checker.fail(f"compel could not read the parts of .{name}(); put each part in quotes and none empty, "
                         f'e.g. ("a red car", "a blue car").{name}(1, 0.5)', dot)
    _judge(checker, conj)
    if conj.lora_weights:  # backstops: the checker refuses both with a position before compel sees them
        checker.fail("withLora()/useLora() in the prompt is not applied by TuneLab", 0)
    if any(getattr(p, "wants_cross_attention_control", False) for p in conj.prompts):
        checker.fail(".swap() is not supported", 0)
    if not any(_words(p) for p in conj.prompts):
        if required:
            checker.fail(f"the {_what(input_name)} has no words, only syntax", None)
        checker.fail(f"the {_what(input_name)} has no words, only syntax; leave it empty instead", None)
    return conj


def _fragments(conj) -> list:
    from compel.prompt_parser import Blend

    out = []
    for p in conj.prompts:
        for q in (p.prompts if isinstance(p, Blend) else [p]):
            out += [f.text for f in getattr(q, "children", []) if isinstance(getattr(f, "text", None), str)]
    return out


def _find(text: str, chunk: str) -> int:
    pos = text.find(chunk)
    return pos if pos >= 0 else 0


def _judge(checker: _Checker, conj) -> None:
    """compel's own reading as the judge: syntax it kept as plain text (parentheses, a weight) is refused, with how
    to write what was meant. The checker's rules catch the known spellings first, with a better message."""
    text = checker.text
    escaped = text.count("\\(") + text.count("\\)")
    for frag in _fragments(conj):
        parens = frag.count("(") + frag.count(")")
        if parens > escaped:
            chunk = next(t for t in frag.split() if "(" in t or ")" in t)
            checker.fail(f"compel reads the parentheses in '{chunk}' as plain text, not as a group (a '(' glued to "
                         "a word, or a group holding '=', is not syntax); put a space before the '(' and keep "
                         "'=' out of groups, or escape literal parentheses as \\( \\)",
                         _find(text, chunk) + max(0, min(k for k in (chunk.find("("), chunk.find(")")) if k >= 0)))
        escaped -= min(escaped, parens)
        m = _LITERAL_WEIGHT.search(frag)
        if m:
            chunk = next((t for t in frag.split() if m.group(1) in t), m.group(1))
            checker.fail(f"compel reads '{chunk}' as plain text, not as a weight; a weight follows a plain word or a "
                         f"(group) directly and ends at a space, a comma or the end, e.g. (words){m.group(1)}",
                         _find(text, chunk))


def _what(input_name: str) -> str:
    """'positive' -> 'positive prompt'; names that say what they are ('prompt', 'instruction') stay as they are."""
    return input_name if ("prompt" in input_name or "instruction" in input_name) else f"{input_name} prompt"


def check_prompts(positive, negatives=(), *, positive_name: str = "positive", negative_name: str = "negative",
                  required: bool = True) -> list:
    """Check a positive prompt and its negative(s) together, before any work: a bad negative is refused before
    anything is generated, not after the first image. Returns the parses, positive first."""
    if isinstance(negatives, str) or negatives is None:
        negatives = [negatives or ""]
    out = [check(positive, input_name=positive_name, required=required)]
    for neg in dict.fromkeys("" if n is None else str(n) for n in negatives):
        out.append(check(neg, input_name=negative_name, required=False))
    return out


def _words(p) -> str:
    from compel.prompt_parser import Blend

    if isinstance(p, Blend):
        return " ".join(_words(q) for q in p.prompts).strip()
    return " ".join(f.text.strip() for f in getattr(p, "children", []) if getattr(f, "text", "").strip())


def _tidy(text: str) -> str:
    return re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s+", " ", text)).strip()


def _clean_parts(conj) -> list[tuple[str, float]]:
    """(text, weight) pairs whose weighted pooled vectors make the clean pooled vector."""
    from compel.prompt_parser import Blend

    if len(conj.prompts) == 1 and isinstance(conj.prompts[0], Blend):
        blend = conj.prompts[0]
        weights = [float(w) for w in blend.weights]
        if blend.normalize_weights:
            total = sum(weights)
            weights = [w / total for w in weights]
        return [(_tidy(_words(p)), w) for p, w in zip(blend.prompts, weights)]
    return [(_tidy(", ".join(t for t in (_words(p) for p in conj.prompts) if t)), 1.0)]


def clean_text(prompt: str) -> str:
    """The prompt with compel syntax stripped, as `pooled_from="clean"` feeds it to TE2 (blend parts joined by '|')."""
    return " | ".join(t for t, _ in _clean_parts(check(prompt, required=False)))


# ---------------------------------------------------------------------------------------------------------------
# compel objects per pipe


class _Encoder:
    """compel objects for one pipe in one text-encoder state.

    compel caches the empty-prompt embedding used by its weighting math, so a cached object must not outlive the
    LoRA stack, device or dtype it was built under; `_encoder_for` keys on all three.
    """

    def __init__(self, pipe, family: str):
        from compel import Compel, CompelForSD, CompelForSDXL, ReturnedEmbeddingsType

        self.family = family
        if family == "sdxl":
            self.compel = CompelForSDXL(pipe)
            inner = [self.compel.compel_1, self.compel.compel_2]
            self.pooled_provider = self.compel.compel_2.conditioning_provider
        elif family == "sdxl-refiner":
            penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
            self.compel = Compel(tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2,
                                 returned_embeddings_type=penultimate, requires_pooled=True,
                                 truncate_long_prompts=False)
            inner = [self.compel]
            self.pooled_provider = self.compel.conditioning_provider
        elif family in ("sd15", "sd2", "ip2p"):
            self.compel = CompelForSD(pipe)
            inner = [self.compel.compel]
            self.pooled_provider = None
        else:
            raise TuneLabError(f"prompt encoding does not support the '{family}' family", input_name="pipe")
        # the components, not the pipe: a value that referenced its WeakKeyDictionary key would keep it alive
        self.te2_parts = (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))
        self.te2_plain = None
        for c in inner:
            _share_parse(c)

    def __call__(self, prompt: str, negative: str, weighted_and: bool = False):
        """(embeds, negative_embeds, pooled, negative_pooled), each with batch 1, embeds padded to equal length."""
        if weighted_and and self.pooled_provider is not None:
            return self._weighted_and(prompt, negative)
        if self.family == "sdxl-refiner":
            embeds, pooled = self.compel([prompt, negative])  # compel pads the pair to the same length
            return embeds[0:1], embeds[1:2], pooled[0:1], pooled[1:2]
        out = self.compel(prompt, negative_prompt=negative)
        return out.embeds, out.negative_embeds, out.pooled_embeds, out.negative_pooled_embeds

    def _weighted_and(self, prompt: str, negative: str):
        """`.and()` with weights on a pooled encoder: compel crashes there (compel#78: it weights against its own
        (embeds, pooled) tuple). Same math from compel's parts: TE2 embeds from a Compel without pooled output,
        pooled from the raw text as compel would, then composed like CompelForSDXL does."""
        import torch
        from compel import Compel, ReturnedEmbeddingsType

        if self.te2_plain is None:
            self.te2_plain = _share_parse(Compel(
                tokenizer=self.te2_parts[0], text_encoder=self.te2_parts[1],
                returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                truncate_long_prompts=False))
        texts = [prompt, negative]
        embeds = self.te2_plain(texts)
        if self.family == "sdxl":
            left = self.compel.compel_1(texts)
            embeds = torch.cat(_pad_to_same_length([left, embeds], [self.compel.compel_1, self.te2_plain]), dim=-1)
        pooled = torch.cat([self.pooled_provider.get_pooled_embeddings([t]) for t in texts])
        return embeds[0:1], embeds[1:2], pooled[0:1], pooled[1:2]

    def clean_pooled(self, conj):
        pooled = None
        for text, weight in _clean_parts(conj):
            p = self.pooled_provider.get_pooled_embeddings([text])
            p = p if weight == 1.0 else p * weight
            pooled = p if pooled is None else pooled + p
        return pooled


_LONG_PROMPT_KEY = "sequence-length-is-longer-than-the-specified-maximum"


class _DropLongPromptWarning:
    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith("Token indices sequence length is longer")


@contextlib.contextmanager
def quiet_long_prompt_warning(pipe):
    """transformers warns "Token indices sequence length is longer than the specified maximum" when compel
    tokenizes a long prompt whole before chunking it; TuneLab never truncates (77-token chunks), so the warning is
    false here. Dropped for our own tokenizer calls only: the filter lives for this block, and each tokenizer's
    warn-once flag is put back afterwards, so a later call elsewhere still warns."""
    import logging

    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None))
                  if isinstance(getattr(t, "deprecation_warnings", None), dict)]
    flags = [(t, t.deprecation_warnings.get(_LONG_PROMPT_KEY)) for t in tokenizers]
    logger = logging.getLogger("transformers.tokenization_utils_base")
    quiet = _DropLongPromptWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
        for tok, flag in flags:
            if flag is None:
                tok.deprecation_warnings.pop(_LONG_PROMPT_KEY, None)
            else:
                tok.deprecation_warnings[_LONG_PROMPT_KEY] = flag


def _share_parse(compel_obj):
    # compel parses every prompt once per encoder with a freshly built grammar (~20 ms for the seed's example on a
    # CPU); `check` has already parsed it with compel's own parser, so the instances reuse that result.
    compel_obj.parse_prompt_string = _parse
    return compel_obj


def _pad_to_same_length(embeds: list, compels: list) -> list:
    """Pad token counts with each encoder's "" chunks, as CompelForSDXL does before concatenating TE1 and TE2."""
    import torch

    longest = max(e.shape[1] for e in embeds)
    out = []
    for e, c in zip(embeds, compels):
        if e.shape[1] < longest:
            pad = c([""])
            e = torch.cat([e, pad.repeat(e.shape[0], (longest - e.shape[1]) // pad.shape[1], 1)], dim=1)
        out.append(e)
    return out


_ENCODERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_ENCODERS_LOCK = threading.Lock()
_STATES_PER_PIPE = 8  # base and LoRA branches of one graph alternate; keep a few states warm


def _encoder_for(handle) -> _Encoder:
    pipe = handle.pipe
    te = pipe.text_encoder_2 if handle.family in ("sdxl", "sdxl-refiner") else pipe.text_encoder
    state = (tuple((r.adapter, float(r.weight), r.sha256) for r in handle.loras), str(te.device), str(te.dtype))
    with _ENCODERS_LOCK:
        per_pipe = _ENCODERS.setdefault(pipe, {})
        enc = per_pipe.get(state)
        if enc is None:
            if len(per_pipe) >= _STATES_PER_PIPE:
                per_pipe.pop(next(iter(per_pipe)))
            enc = per_pipe[state] = _Encoder(pipe, handle.family)
        return enc


# ---------------------------------------------------------------------------------------------------------------
# the one encoding function


def encode(handle, prompt: str, negative: str = "", batch: int = 1, *, pooled_from: str = "raw") -> Conditioning:
    """Encode a compel-syntax prompt pair for `handle`'s pipe, with `handle`'s LoRA stack active.

    Positive and negative are chunked (77 tokens each, never truncated) and padded to the same length; an empty
    negative is encoded as "". `batch` copies are stacked along dim 0. `pooled_from` ("raw"/"clean") picks the
    text the SDXL pooled vector is computed from (see the module docstring).
    """
    import torch

    if pooled_from not in POOLED_FROM:
        raise TuneLabError(f"unknown value '{pooled_from}'; choose raw or clean", input_name="pooled_from")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise TuneLabError(f"batch size must be a whole number from 1 to {MAX_BATCH}, got {batch!r}",
                           input_name="batch_size")
    prompt = "" if prompt is None else str(prompt)
    negative = "" if negative is None else str(negative)
    pos_conj = check(prompt, input_name="positive", required=True)
    neg_conj = check(negative, input_name="negative", required=False)

    lora.activate(handle)
    enc = _encoder_for(handle)
    with torch.no_grad(), quiet_long_prompt_warning(handle.pipe):
        weighted_and = any(w != 1 for w in list(pos_conj.weights) + list(neg_conj.weights))
        embeds, neg_embeds, pooled, neg_pooled = enc(prompt, negative, weighted_and)
        if pooled_from == "clean" and pooled is not None:
            pooled, neg_pooled = enc.clean_pooled(pos_conj), enc.clean_pooled(neg_conj)
    if batch > 1:
        embeds, neg_embeds = embeds.repeat(batch, 1, 1), neg_embeds.repeat(batch, 1, 1)
        if pooled is not None:
            pooled, neg_pooled = pooled.repeat(batch, 1), neg_pooled.repeat(batch, 1)
    return Conditioning(prompt=prompt, negative=negative, embeds=embeds, negative_embeds=neg_embeds,
                        pooled=pooled, negative_pooled=neg_pooled, family=handle.family, loras=handle.loras)
