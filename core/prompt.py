"""Weighted prompts in compel syntax -> `Conditioning` (the TUNELAB_COND value).

`encode` is the one encoding function: the nodes, the CLI, the synthesis jobs and the trainers all call it, so a prompt
means the same thing everywhere. Prompts are parsed by compel's own parser and weighted with compel's math
(`core/weighting.py`, one function over an "encode these token windows" callback), so the result equals compel's
(CompelForSDXL for SDXL base, a single-encoder Compel on TE2 for the refiner, CompelForSD for SD1.x/SD2.x/
InstructPix2Pix). `encode_with` runs the same math on any text encoders: `_encoders_for` wraps a diffusers pipe's,
and host.py wraps a native ComfyUI CLIP the same way (TuneLab Weighted Prompt (CLIP)). This module adds what compel
leaves out:

- a syntax check with positions, because compel's parser is lenient: an unclosed `(`, a dangling `++`, `(x)1.3.5`
  or text after `.and()` are silently read as literal text or dropped (`.blend()` with no weights is compel's
  "equal weights" and stays legal);
- long prompts chunked (never truncated), positive and negative padded to the same length;
- batch copies made along dim 0 (compel's own batching trips over `num_images_per_prompt`, compel#37);
- `.and()` with weights on the pooled (SDXL) encoders, where compel crashes (compel#78), computed from compel's
  own parts with the same math;
- the empty-prompt encodings compel's math needs cached per pipe and text-encoder state (LoRA stack, device, dtype).

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
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

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


# Characters that can start compel syntax (weights, groups, quotes, escapes, operator arguments). A prompt without
# any is one weight-1 fragment to compel's grammar: its words joined by single spaces, after compel's own
# comma-spacing rewrite. tests/test_native_weighting.py checks this against compel's parser.
_SYNTAX_CHARS = frozenset('()"+-=\\')


def _plain_conjunction(text: str):
    from compel.prompt_parser import Conjunction, FlattenedPrompt, Fragment

    return Conjunction(prompts=[FlattenedPrompt([Fragment(" ".join(re.sub(r",(\S)", r", \1", text).split()), 1.0)])],
                       weights=[1.0])


@functools.lru_cache(maxsize=512)
def _parse(text: str):
    """compel's own parser, one grammar kept for the process (compel builds a fresh one per call, ~2 ms). Text
    without syntax characters skips the grammar (pyparsing takes ~1 ms per word there) for the same result."""
    global _PARSER
    from compel.prompt_parser import PromptParser

    if text.strip() and not _SYNTAX_CHARS.intersection(text):
        return _plain_conjunction(text)
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
# encoding: compel's math (core/weighting.py) over any text encoders


@dataclass(frozen=True)
class TextEncoders:
    """What compel's math needs from a model's text encoders.

    `vocabularies`: key -> `weighting.Vocabulary`; `encode`: the `weighting.Encode` callback; `order`: the keys in
    the order their embeddings are concatenated (SDXL: CLIP-L then CLIP-G, as compel and ComfyUI do);
    `pooled_key`: the encoder whose pooled vector conditions the model (SDXL / refiner: CLIP-G), or None.
    """

    vocabularies: Mapping[str, Any]
    encode: Callable
    order: tuple
    pooled_key: Optional[str] = None


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


def _pooled_parts(text: str, conj, pooled_from: str) -> list[tuple[str, float]]:
    return [(text, 1.0)] if pooled_from == "raw" else _clean_parts(conj)


def encode_with(encoders: TextEncoders, positive: str, negative: str = "", *, pooled_from: str = "raw",
                split: Optional[Mapping[str, tuple]] = None, names: Optional[Mapping[str, tuple]] = None):
    """Encode a positive/negative pair with compel's math on `encoders`.

    `split`: key -> (positive, negative) for encoders that read other text than `positive`/`negative` (SDXL's
    text_l, compel's main prompt beside its style prompt); the pooled encoder always reads `positive`/`negative`.
    `names`: key -> (positive input name, negative input name) for the syntax errors of split texts.
    Returns (embeds, negative_embeds, pooled, negative_pooled) with batch 1; pooled are None without a pooled key.
    """
    import torch

    from . import weighting

    if pooled_from not in POOLED_FROM:
        raise TuneLabError(f"unknown value '{pooled_from}'; choose raw or clean", input_name="pooled_from")
    texts = {k: (positive, negative) for k in encoders.order}
    unknown = set(split or {}) - set(encoders.order)
    if unknown:
        raise TuneLabError(f"no text encoder {sorted(unknown)} here; this model has {list(encoders.order)}",
                           input_name="prompt")
    texts.update(split or {})
    conjs = {}
    for key in encoders.order:
        pos_name, neg_name = (names or {}).get(key, ("positive", "negative"))
        pos, neg = texts[key]
        conjs[key] = (check(pos, input_name=pos_name, required=True), check(neg, input_name=neg_name, required=False))

    pooled_parts = []
    if encoders.pooled_key is not None:
        pk = encoders.pooled_key
        pooled_parts = [_pooled_parts(positive, conjs[pk][0], pooled_from),
                        _pooled_parts(negative, conjs[pk][1], pooled_from)]
        vocab = encoders.vocabularies[pk]
        windows = [weighting.pooled_window(vocab, t) for parts in pooled_parts for t, _ in parts]
        pooled_request = {pk: windows}
    else:
        pooled_request = {}
    with torch.no_grad():
        out, pooled_out = weighting.encode_conjunctions({k: list(conjs[k]) for k in encoders.order},
                                                        encoders.vocabularies, encoders.encode,
                                                        pooled=pooled_request)
    embeds = [torch.cat([out[k][i] for k in encoders.order], dim=-1) for i in (0, 1)]
    pooled = [None, None]
    if pooled_parts:
        vectors = pooled_out[encoders.pooled_key]
        row = 0
        for i, parts in enumerate(pooled_parts):
            total = None
            for _, weight in parts:
                p = vectors[row:row + 1]
                row += 1
                p = p if weight == 1.0 else p * weight
                total = p if total is None else total + p
            pooled[i] = total
    return embeds[0], embeds[1], pooled[0], pooled[1]


# ---------------------------------------------------------------------------------------------------------------
# the diffusers text encoders as a callback

_PENULTIMATE_FAMILIES = ("sdxl", "sdxl-refiner")  # compel's PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED; else last


def vocabulary(tokenizer):
    """A `weighting.Vocabulary` for a transformers CLIP tokenizer, tokenizing as compel's `get_token_ids` does."""
    from . import weighting

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def tokenize(texts):
        out = []
        for ids in tokenizer(list(texts), truncation=False, padding="do_not_pad", return_tensors=None)["input_ids"]:
            if ids and ids[0] == bos:
                ids = ids[1:]
            if ids and ids[-1] == eos:
                ids = ids[:-1]
            out.append(ids)
        return out

    return weighting.Vocabulary(bos=bos, eos=eos, pad=tokenizer.pad_token_id, tokenize=tokenize,
                                token_strings=lambda ids: tokenizer.convert_ids_to_tokens(list(ids)))


class _DiffusersEncode:
    """The callback for one pipe in one text-encoder state: each window through its encoder alone, with the
    attention mask compel passes (so the result is compel's to the bit). The two empty windows compel caches are
    cached here too, per state (`_encoders_for`)."""

    def __init__(self, components: Mapping[str, tuple], vocabularies: Mapping[str, Any], penultimate: bool):
        from . import weighting

        self.components = components  # key -> (tokenizer, text encoder)
        self.penultimate = penultimate
        self.cache: dict = {}
        self.cacheable = {(k, weighting.empty_window(v, masked=m)) for k, v in vocabularies.items()
                          for m in (False, True)}

    def _z(self, te, window):
        import torch

        ids = torch.tensor([window.ids], dtype=torch.long, device=te.device)
        mask = None if window.mask is None else torch.tensor([window.mask], dtype=torch.long, device=te.device)
        out = te(ids, mask, output_hidden_states=self.penultimate, return_dict=True)
        return out.hidden_states[-2] if self.penultimate else out.last_hidden_state

    def __call__(self, requests, pooled):
        import torch

        z = {}
        for key, windows in requests.items():
            te = self.components[key][1]
            rows = []
            for w in windows:
                row = self.cache.get((key, w))
                if row is None:
                    row = self._z(te, w)
                    if (key, w) in self.cacheable:
                        self.cache[(key, w)] = row
                rows.append(row)
            z[key] = torch.cat(rows)
        vectors = {}
        for key, windows in pooled.items():
            te = self.components[key][1]
            rows = []
            for w in windows:  # one text per call, as compel's get_pooled_embeddings([text])
                out = te(torch.tensor([w.ids], dtype=torch.long, device=te.device), None, return_dict=True)
                rows.append(out.pooler_output if hasattr(out, "pooler_output") else out.text_embeds)
            vectors[key] = torch.cat(rows)
        return z, vectors


def _components(pipe, family: str) -> dict:
    if family == "sdxl":
        return {"te1": (pipe.tokenizer, pipe.text_encoder), "te2": (pipe.tokenizer_2, pipe.text_encoder_2)}
    if family == "sdxl-refiner":
        return {"te2": (pipe.tokenizer_2, pipe.text_encoder_2)}
    if family in ("sd15", "sd2", "ip2p"):
        return {"te1": (pipe.tokenizer, pipe.text_encoder)}
    raise TuneLabError(f"prompt encoding does not support the '{family}' family", input_name="pipe")


_ENCODERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_ENCODERS_LOCK = threading.Lock()
_STATES_PER_PIPE = 8  # base and LoRA branches of one graph alternate; keep a few states warm


def _encoders_for(handle) -> TextEncoders:
    """The pipe's text encoders as `TextEncoders`. The cached empty-window encodings must not outlive the LoRA
    stack, device or dtype they were made under, so the cache is keyed on all three."""
    pipe = handle.pipe
    components = _components(pipe, handle.family)
    te = components.get("te2", components.get("te1"))[1]
    state = (tuple((r.adapter, float(r.weight), r.sha256) for r in handle.loras), str(te.device), str(te.dtype))
    with _ENCODERS_LOCK:
        per_pipe = _ENCODERS.setdefault(pipe, {})
        enc = per_pipe.get(state)
        if enc is None:
            if len(per_pipe) >= _STATES_PER_PIPE:
                per_pipe.pop(next(iter(per_pipe)))
            # the components, not the pipe: a value that referenced its WeakKeyDictionary key would keep it alive
            vocabularies = {k: vocabulary(tok) for k, (tok, _) in components.items()}
            callback = _DiffusersEncode(components, vocabularies, handle.family in _PENULTIMATE_FAMILIES)
            enc = per_pipe[state] = TextEncoders(
                vocabularies=vocabularies, encode=callback, order=tuple(components), pooled_key="te2" if handle.family in _PENULTIMATE_FAMILIES else None)
        return enc


# ---------------------------------------------------------------------------------------------------------------
# the one encoding function


def encode(handle, prompt: str, negative: str = "", batch: int = 1, *, pooled_from: str = "raw") -> Conditioning:
    """Encode a compel-syntax prompt pair for `handle`'s pipe, with `handle`'s LoRA stack active.

    Positive and negative are chunked (77 tokens each, never truncated) and padded to the same length; an empty
    negative is encoded as "". `batch` copies are stacked along dim 0. `pooled_from` ("raw"/"clean") picks the
    text the SDXL pooled vector is computed from (see the module docstring).
    """
    if pooled_from not in POOLED_FROM:
        raise TuneLabError(f"unknown value '{pooled_from}'; choose raw or clean", input_name="pooled_from")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise TuneLabError(f"batch size must be a whole number from 1 to {MAX_BATCH}, got {batch!r}",
                           input_name="batch_size")
    prompt = "" if prompt is None else str(prompt)
    negative = "" if negative is None else str(negative)
    check(prompt, input_name="positive", required=True)  # refuse before any model work
    check(negative, input_name="negative", required=False)

    lora.activate(handle)
    encoders = _encoders_for(handle)
    with quiet_long_prompt_warning(handle.pipe):
        embeds, neg_embeds, pooled, neg_pooled = encode_with(encoders, prompt, negative, pooled_from=pooled_from)
    te = encoders.encode.components[encoders.order[-1]][1]
    embeds, neg_embeds = embeds.to(te.device, te.dtype), neg_embeds.to(te.device, te.dtype)
    if pooled is not None:
        pooled, neg_pooled = pooled.to(te.device, te.dtype), neg_pooled.to(te.device, te.dtype)
    if batch > 1:
        embeds, neg_embeds = embeds.repeat(batch, 1, 1), neg_embeds.repeat(batch, 1, 1)
        if pooled is not None:
            pooled, neg_pooled = pooled.repeat(batch, 1), neg_pooled.repeat(batch, 1)
    return Conditioning(prompt=prompt, negative=negative, embeds=embeds, negative_embeds=neg_embeds,
                        pooled=pooled, negative_pooled=neg_pooled, family=handle.family, loras=handle.loras)
