"""Grids keep their labels: at small sizes the labels and the caption wrap (and shrink) instead of being cut off,
and the comparison grid says its steps, guidance, size and LoRA under the caption."""
from PIL import Image, ImageDraw

from tunelab.core import compare, images, lora, tiny

LABELS = ["base", "base + negative 'wrong'", "LoRA + negative 'wrong'"]
CAPTION = "seed 42: " + compare.DEFAULT_PROMPT


def _measure(font):
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return lambda t: draw.textlength(t, font=font)


def assert_whole(text, fitted, width):
    font, lines, _ = fitted
    assert " ".join(lines) == " ".join(text.split()), (text, lines)  # nothing dropped, no ellipsis
    assert all(_measure(font)(line) <= width for line in lines), lines


def test_wrap_keeps_every_word_and_breaks_only_overlong_words():
    measure = len  # one pixel per character
    assert images.wrap("base + negative 'wrong'", 10, measure) == ["base +", "negative", "'wrong'"]
    assert images.wrap("supercalifragilistic", 8, measure) == ["supercal", "ifragili", "stic"]
    assert images.wrap("", 8, measure) == [""]


def test_small_panels_wrap_labels_and_caption_instead_of_cutting_them():
    panels = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    details = "20 steps · guidance 13 · 64x64 · LoRA tiny-sdxl-wrong-lora"
    lay = images.grid_layout(panels, LABELS, caption=CAPTION, details=details)
    for label, fitted in zip(LABELS, lay["labels"]):
        assert_whole(label, fitted, 64 - 8)
    assert len(lay["labels"][1][1]) >= 2  # "base + negative 'wrong'" needed more than one line at 64 px
    assert_whole(CAPTION, lay["caption"], 3 * 64 - 8)
    assert_whole(details, lay["details"], 3 * 64 - 8)
    grid = images.labelled_grid(panels, LABELS, caption=CAPTION, details=details)
    assert grid.size == lay["size"]
    # the panels sit below the header and the (tallest) label strip, unscaled
    top = lay["header"] + lay["strip"]
    assert grid.getpixel((10, top + 5)) == (255, 0, 0) and grid.getpixel((64 + 10, top + 5)) == (0, 128, 0)
    # and the label strip holds ink on its second line (the wrapped part of the label)
    font, lines, lh = lay["labels"][1]
    strip = grid.crop((64, lay["header"] + 2 + lh, 128, lay["header"] + 2 + 2 * lh))
    assert min(strip.convert("L").getdata()) < 128


def test_large_panels_keep_one_line_labels_at_full_size():
    panels = [Image.new("RGB", (512, 512))] * 3
    lay = images.grid_layout(panels, LABELS, caption=CAPTION)
    assert all(len(lines) == 1 for _, lines, _ in lay["labels"])
    assert lay["labels"][0][0].size == 28  # no shrinking when it fits


def test_comparison_grid_shows_settings_and_lora_under_the_caption(tiny_sdxl):
    lora_pipe = lora.load(tiny_sdxl, tiny.wrong_lora(), 0.8)
    result = compare.run(compare.default_states(tiny_sdxl, lora_pipe), "a cat", seed=1, steps=1, guidance=7.5,
                         width=64, height=64)
    details = compare.grid_details(compare.default_states(tiny_sdxl, lora_pipe), steps=1, guidance=7.5, width=64,
                                   height=64)
    assert details == f"1 steps · guidance 7.5 · 64x64 · LoRA {tiny.wrong_lora().stem} @ 0.8"
    lay = images.grid_layout(result.panels, LABELS, caption="seed 1: a cat", details=details)
    assert result.grid.size == lay["size"]
    assert compare.grid_details(compare.default_states(tiny_sdxl, None), steps=2, guidance=13, width=8,
                                height=8).endswith("no LoRA")
