"""compel's prompt-weighting math as one function over an "encode these token windows" callback.

`encode_conjunctions` takes prompts already parsed by compel's own parser (`Conjunction`s) and reproduces what
compel (`Compel`, `CompelForSD`, `CompelForSDXL`, compel 2.x, `truncate_long_prompts=False`, DownweightMode.MASK,
SplitLongTextMode.SENTENCES) computes from them, for any text encoders that can encode 77-token windows:

- every fragment is tokenized on its own; the token run is split into chunks of at most 75 tokens at compel's split
  points (the last '.' within the chunk, else the last ',' '.' ';' ':', else the last word end, else 75), each chunk
  wrapped in BOS ... EOS and padded to 77 with the tokenizer's pad token;
- weights >= 1 (and all weights on their own tokens): z_w = z_empty + (z - z_empty) * w per token, where z_empty is
  the encoding of BOS EOS pad...; tokens of weight 1 keep z exactly;
- weights < 1: for each such fragment a second encoding with the fragment attention-masked out (chunk BOS/EOS kept),
  blended with the base as [1, tan((1 - w) * pi / 2), ...] normalized to sum 1;
- `.blend()`: the parts padded with z_empty chunks to one length, then summed with the (normalized) blend weights;
- `.and()`: the parts concatenated along the tokens; a part weight w != 1 gives empty + (part - empty) * w, where
  "empty" is the encoding of "" padded with z_empty chunks (compel crashes on this with a pooled encoder, compel#78;
  this is the same math without the crash);
- every prompt of the call padded with z_empty chunks to the longest (the positive/negative pair), and, across text
  encoders, with the encoding of "" (CompelForSDXL's padding between its two encoders).

compel's own default split mode (SENTENCES, without COPY_FIRST_CLS_TOKEN) copies no CLS token between chunks, so
neither does this. Pooled vectors are compel's `get_pooled_embeddings`: the text encoder run once on a text
truncated to one window (`pooled_window`).

The callback receives, per text encoder key, a list of distinct `Window`s and returns their token embeddings as one
float tensor [n, 77, D] (n in request order); `Window.mask` None means "no attention mask" (compel's z_empty and
pooled calls), a tuple is an explicit mask (1 attend, 0 masked; all ones for a plain prompt chunk, as compel passes
it). Nothing here imports a text-encoder library: diffusers' encoders (core/prompt.py) and ComfyUI's CLIP (host.py)
each supply a callback.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from .errors import TuneLabError

CHUNK = 77
_EPSILON = 1e-5  # compel: a weight of 0 would need an infinite lerp weight
_SENTENCE_END = (".</w>",)
_PHRASE_END = (".</w>", ",</w>", ";</w>", ":</w>")


@dataclass(frozen=True)
class Vocabulary:
    """The token side of one text encoder: its special tokens and tokenizer.

    `tokenize(texts)` returns each text's token ids without BOS/EOS and untruncated; `token_strings(ids)` the BPE
    strings of ids (word ends carry '</w>'), which decide compel's split points.
    """

    bos: int
    eos: int
    pad: int
    tokenize: Callable[[Sequence[str]], list]
    token_strings: Callable[[Sequence[int]], list]

    @property
    def content(self) -> int:
        return CHUNK - 2


@dataclass(frozen=True)
class Window:
    ids: tuple
    mask: Optional[tuple] = None  # None: no attention mask passed; else one 0/1 per position


# (windows per key, pooled windows per key) -> ({key: z [n, 77, D]}, {key: pooled [m, P]})
Encode = Callable[[Mapping[str, Sequence[Window]], Mapping[str, Sequence[Window]]], tuple]


def empty_window(vocab: Vocabulary, *, masked: bool) -> Window:
    """BOS EOS pad...: compel's z_empty (no mask) or its encoding of "" as a prompt (an all-ones mask)."""
    ids = (vocab.bos, vocab.eos) + (vocab.pad,) * (CHUNK - 2)
    return Window(ids, (1,) * CHUNK if masked else None)


def pooled_window(vocab: Vocabulary, text: str) -> Window:
    """compel's `get_pooled_embeddings([text])` input: the text truncated to one window, no attention mask."""
    ids = list(vocab.tokenize([text])[0])[:vocab.content]
    ids = [vocab.bos] + ids + [vocab.eos]
    return Window(tuple(ids + [vocab.pad] * (CHUNK - len(ids))), None)


# ---------------------------------------------------------------------------------------------------------------
# planning: token-level work, no encoder calls


class _Table:
    """Distinct windows of one text encoder, in first-request order."""

    def __init__(self):
        self.index: dict = {}

    def add(self, window: Window) -> int:
        return self.index.setdefault(window, len(self.index))


@dataclass
class _Flat:
    chunks: list  # [(window index, per-token weights tuple | None when all weights are 1)]
    withouts: list  # [(lerp weight, [window index per chunk])]

    @property
    def length(self) -> int:
        return len(self.chunks)

    @property
    def needs_empty(self) -> bool:
        return any(w is not None for _, w in self.chunks)


@dataclass
class _Blend:
    parts: list
    weights: list
    normalize: bool

    @property
    def length(self) -> int:
        return max(p.length for p in self.parts)

    @property
    def needs_empty(self) -> bool:
        return any(p.needs_empty for p in self.parts) or len({p.length for p in self.parts}) > 1


@dataclass
class _Conj:
    parts: list
    weights: list

    @property
    def length(self) -> int:
        return sum(p.length for p in self.parts)

    @property
    def needs_empty(self) -> bool:
        return any(p.needs_empty for p in self.parts) or any(w != 1 for w in self.weights)

    @property
    def needs_masked_empty(self) -> bool:  # compel's "" conditioning for weighted .and() parts
        return any(w != 1 for w in self.weights)


def _split_point(vocab: Vocabulary, ids: list) -> int:
    """compel's `_find_next_best_split_point` in SENTENCES mode (falling back to PHRASES, then WORDS, then 75)."""
    limit = vocab.content
    if len(ids) <= limit:
        return limit
    strings = vocab.token_strings(ids[:limit])
    for ends in (_SENTENCE_END, _PHRASE_END, None):
        for i in range(len(strings) - 1, -1, -1):
            s = strings[i]
            if (s.endswith("</w>") if ends is None else s in ends):
                return i + 1
    return limit


def _chunk_tokens(vocab: Vocabulary, fragments: list, weights: list):
    """compel's `get_token_ids_and_expand_weights`: (token ids, per-token weights), chunked and padded."""
    if not fragments:
        fragments, weights = [""], [1.0]
    ids, per_token = [], []
    for frag_ids, w in zip(vocab.tokenize(fragments), weights):
        ids += list(frag_ids)
        per_token += [float(w)] * len(frag_ids)
    all_ids, all_w = [], []
    while True:
        cut = _split_point(vocab, ids)
        chunk_ids, chunk_w = ids[:cut], per_token[:cut]
        ids, per_token = ids[cut:], per_token[cut:]
        chunk_ids = [vocab.bos] + chunk_ids + [vocab.eos]
        chunk_w = [1.0] + chunk_w + [1.0]
        pad = CHUNK - len(chunk_ids)
        all_ids += chunk_ids + [vocab.pad] * pad
        all_w += chunk_w + [1.0] * pad
        if not ids:
            break
    return all_ids, all_w


def _fragment_ranges(vocab: Vocabulary, ids: list, fragments: list) -> list:
    """compel's `_get_token_ranges_for_fragments` (untruncated): (first, last) token index of each fragment."""
    if not fragments:
        fragments = [""]
    out, start, n = [], 0, len(ids)
    boundary = (vocab.eos, vocab.pad, vocab.bos)
    for index, frag_ids in enumerate(vocab.tokenize(fragments)):
        frag_ids = list(frag_ids)
        if not frag_ids:
            out.append(None)
            continue
        while True:
            if start >= n - 1:
                raise TuneLabError(f"could not place the fragment '{fragments[index]}' in its tokens (compel fails "
                                   f"here too)", input_name="prompt")
            if ids[start] == frag_ids[0]:
                break
            start += 1
        end, rel = start, 0
        while True:
            if end >= n - 1:
                raise TuneLabError(f"could not find the end of the fragment '{fragments[index]}' in its tokens "
                                   f"(compel fails here too)", input_name="prompt")
            if ids[end] == frag_ids[rel]:
                rel += 1
                if rel == len(frag_ids):
                    break
                end += 1
            elif ids[end] in boundary:  # chunk boundary: BOS/EOS/pad between two chunks
                end += 1
            else:
                raise TuneLabError(f"token mismatch in the fragment '{fragments[index]}' (compel fails here too)",
                                   input_name="prompt")
        out.append((start, end))
        start = end + 1
    return out


def _plan_flat(vocab: Vocabulary, table: _Table, prompt) -> _Flat:
    fragments = [f.text for f in prompt.children]
    weights = [float(f.weight) for f in prompt.children]
    ids, per_token = _chunk_tokens(vocab, fragments, weights)
    n = len(ids) // CHUNK
    ones = (1,) * CHUNK
    chunks = []
    for c in range(n):
        w = tuple(per_token[c * CHUNK:(c + 1) * CHUNK])
        chunks.append((table.add(Window(tuple(ids[c * CHUNK:(c + 1) * CHUNK]), ones)),
                       None if w.count(1.0) == CHUNK else w))
    withouts = []
    ranges = _fragment_ranges(vocab, ids, fragments) if any(w < 1 for w in weights) else []
    for index, rng in enumerate(ranges):
        w = weights[index]
        if w >= 1 or rng is None:  # compel crashes on a down-weighted fragment without tokens; nothing to mask
            continue
        mask = [1] * len(ids)
        for i in range(rng[0], rng[1] + 1):
            mask[i] = 0
        for i in range(0, len(ids), CHUNK):  # compel keeps the chunk-delimiting BOS and last position
            mask[i] = 1
            mask[i + CHUNK - 1] = 1
        per_chunk = []
        for c in range(n):
            m = tuple(mask[c * CHUNK:(c + 1) * CHUNK])
            per_chunk.append(chunks[c][0] if m == ones else table.add(Window(tuple(ids[c * CHUNK:(c + 1) * CHUNK]), m)))
        withouts.append((math.tan((1.0 - max(_EPSILON, w)) * math.pi / 2), per_chunk))
    return _Flat(chunks, withouts)


def _plan(vocab: Vocabulary, table: _Table, conj) -> _Conj:
    from compel.prompt_parser import Blend, FlattenedPrompt

    parts = []
    for p in conj.prompts:
        if isinstance(p, Blend):
            parts.append(_Blend([_plan_flat(vocab, table, q) for q in p.prompts], [float(w) for w in p.weights],
                                bool(p.normalize_weights)))
        elif isinstance(p, FlattenedPrompt):
            parts.append(_plan_flat(vocab, table, p))
        else:
            raise TuneLabError(f"unsupported prompt part {type(p).__name__}", input_name="prompt")
    if len(parts) > 1 and getattr(conj, "type", "AND") != "AND":
        raise TuneLabError("only .and() conjunctions can be encoded", input_name="prompt")
    return _Conj(parts, [float(w) for w in conj.weights])


# ---------------------------------------------------------------------------------------------------------------
# assembling: the tensor math, in compel's order of operations


class _Assembler:
    def __init__(self, z, empty: Optional[int], masked_empty: Optional[int]):
        self.z = z  # [n, 77, D]
        self.empty = None if empty is None else z[empty:empty + 1]  # [1, 77, D]
        self.masked_empty = None if masked_empty is None else z[masked_empty:masked_empty + 1]

    def pad(self, t, length: int, with_masked=False):
        filler = self.masked_empty if with_masked else self.empty
        while t.shape[1] < length * CHUNK:
            t = self._torch.cat([t, filler], dim=1)
        return t

    @property
    def _torch(self):
        import torch

        return torch

    def weighted(self, chunks: list, windows: list):
        torch = self._torch
        out = []
        for (_, w), index in zip(chunks, windows):
            z = self.z[index:index + 1]
            if w is not None:
                weights = torch.tensor(w, dtype=torch.float32, device=z.device).reshape(CHUNK, 1).expand(z.shape)
                identity = weights == 1
                z = torch.where(identity, z, self.empty + (z - self.empty) * weights)
            out.append(z)
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def flat(self, plan: _Flat):
        torch = self._torch
        base = self.weighted(plan.chunks, [i for i, _ in plan.chunks])
        if not plan.withouts:  # compel multiplies by a normalized weight of exactly 1 here: the same values
            return base
        embeddings = base.unsqueeze(0)
        lerp = [1.0]
        for t, windows in plan.withouts:
            embeddings = torch.cat((embeddings, self.weighted(plan.chunks, windows).unsqueeze(0)), dim=1)
            lerp.append(t)
        return _apply_weights(embeddings, lerp, True)

    def blend(self, plan: _Blend):
        length = plan.length
        parts = [self.pad(self.flat(p), length) for p in plan.parts]
        return _apply_weights(self._torch.cat(parts).unsqueeze(0), plan.weights, plan.normalize)

    def conj(self, plan: _Conj):
        out = []
        for part, w in zip(plan.parts, plan.weights):
            c = self.blend(part) if isinstance(part, _Blend) else self.flat(part)
            if w != 1:
                empty = self.pad(self.masked_empty, part.length)
                c = empty + (c - empty) * w
            out.append(c)
        return self._torch.concat(out, dim=1)


def _apply_weights(embeddings, weights: list, normalize: bool):
    """compel's `EmbeddingsProvider.apply_embedding_weights`: [1, n, L, D] x n weights -> [1, L, D]."""
    import torch

    w = torch.tensor(weights, dtype=embeddings.dtype, device=embeddings.device)
    if normalize:
        w = w / torch.sum(w)
    return torch.sum(embeddings * w.reshape(w.shape + (1, 1)), dim=1)


# ---------------------------------------------------------------------------------------------------------------
# the one function


def encode_conjunctions(prompts: Mapping[str, Sequence], vocabularies: Mapping[str, Vocabulary], encode: Encode,
                        *, pooled: Optional[Mapping[str, Sequence[Window]]] = None):
    """Encode parsed prompts with compel's math.

    `prompts`: text encoder key -> the `Conjunction`s that encoder gets (e.g. [positive, negative]; the SDXL keys
    get the same list unless text_g/text_l differ). Every key must get the same number of prompts.
    `pooled`: key -> windows whose pooled vectors the callback computes in the same round (`pooled_window`).

    Returns ({key: [tensor [1, L, D] per prompt]}, {key: tensor [len(pooled[key]), P]}); every prompt of every
    key is padded to one length L (a multiple of 77), as compel pads a positive/negative pair and CompelForSDXL pads
    its two encoders.
    """
    keys = list(prompts)
    counts = {len(prompts[k]) for k in keys}
    if len(counts) != 1:
        raise TuneLabError("every text encoder needs the same number of prompts", input_name="prompt")
    tables = {k: _Table() for k in keys}
    plans = {k: [_plan(vocabularies[k], tables[k], c) for c in prompts[k]] for k in keys}

    per_key_length = {k: max(p.length for p in plans[k]) for k in keys}
    length = max(per_key_length.values())
    specials = {}
    for k in keys:
        need_empty = (any(p.needs_empty for p in plans[k]) or len({p.length for p in plans[k]}) > 1)
        need_masked = any(p.needs_masked_empty for p in plans[k]) or per_key_length[k] < length
        specials[k] = (tables[k].add(empty_window(vocabularies[k], masked=False)) if need_empty else None,
                       tables[k].add(empty_window(vocabularies[k], masked=True)) if need_masked else None)
    requests = {k: list(t.index) for k, t in tables.items()}
    z, pooled_out = encode(requests, {k: list(ws) for k, ws in (pooled or {}).items()})

    out = {}
    for k in keys:
        asm = _Assembler(z[k], *specials[k])
        conds = [asm.pad(asm.conj(p), per_key_length[k]) for p in plans[k]]  # the pair, within one encoder
        out[k] = [asm.pad(c, length, with_masked=True) for c in conds]  # across encoders
    return out, pooled_out
