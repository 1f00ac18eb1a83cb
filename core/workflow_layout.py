"""What a person sees when a UI-format workflow opens: node sizes, overlaps, groups, the first view, notes,
model hints and the template-browser thumbnail. Pure Python; never imports ComfyUI.

The ComfyUI frontend (comfyui-frontend 1.35 to 1.58, litegraph's ``LGraphNode.computeSize``) widens a node on
load to ``max(saved size, computed size)``. Its computed width is the largest of: title text (14 px) + 40, the
input and output slot labels (12 px) side by side + 45, the longest widget label + 104, and 210 for any node
with widgets. So a node saved narrower than its title grows to the right, over its neighbour. The rules here
estimate that size from above (text widths from a deliberately generous per-character table) and ask every
saved size to be at least the estimate, with a gap between rectangles.

There are two first views. The pinned 1.35 restores the saved ``extra.ds``; 1.58 ignores it when a workflow is
opened from the template browser and fits every node into 75% of the window (``fitToBounds``). Rule for both:
every node's and group's title bar lies in the part of a 1280 x 800 window that the frontend's chrome leaves free
(sidebar on the left, tabs, workflow-name chip and run bar at the top), at a zoom the frontend draws text at
(below ~0.57 it draws blank boxes). So a whole graph must fit in about 1580 x 980 px; a node too tall for that
(TuneLab Train LoRA) is saved collapsed (``flags.collapsed``: both versions draw its title only, one click
expands it), with the space it expands into kept free.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from .workflow import VIRTUAL_NODES, InputSpec, WorkflowError, ui_links, ui_widget_values

TITLE_HEIGHT = 30               # LiteGraph.NODE_TITLE_HEIGHT
SLOT_HEIGHT = 20                # LiteGraph.NODE_SLOT_HEIGHT
TITLE_PX, LABEL_PX = 14, 12     # title and widget/slot label font sizes
GAP = 20                        # free space asked between two node rectangles
GROUP_TITLE = 40                # a group's title bar, kept free of nodes
NOTE_TYPES = ("Note", "MarkdownNote")
VIEWPORT = (1280, 800)          # the reference window for the first view
# the part of that window no chrome covers (measured on 1.35.9 and 1.58.1: sidebar 56 px wide, tabs 38 px high,
# workflow-name chip and run bar down to y = 90, zoom controls in the bottom 50 px)
SAFE = (70, 100, VIEWPORT[0] - 10, VIEWPORT[1] - 60)
MIN_SCALE = 0.6                 # the frontend's text level-of-detail cut is 8 px / 14 px = 0.57
FIT_FRACTION, FIT_PAD = 0.75, 10  # 1.58's template open: DragAndScale.fitToBounds(createBounds(nodes, 10), 0.75)
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
THUMB_MIN, THUMB_MAX, THUMB_MAX_BYTES = 128, 1024, 200_000

# em widths, rounded up from common UI sans-serif fonts (Inter, Arial): an overestimate on purpose
_NARROW, _WIDE_LOWER, _WIDE_UPPER = set("ijlI.,:;'!|`()[]{}/\\ "), set("mw"), set("MW@%")


def text_width(text: str, px: float) -> float:
    """A conservative width in pixels of `text` at font size `px`."""
    em = 0.0
    for ch in str(text):
        if ch in _NARROW:
            em += 0.34
        elif ch in _WIDE_LOWER:
            em += 0.92
        elif ch in _WIDE_UPPER:
            em += 1.02
        elif ch.isupper():
            em += 0.76
        else:
            em += 0.62
    return em * px


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float

    def gap_to(self, other: "Box") -> float:
        """Distance between two rectangles (negative: they overlap by that much on the shorter axis)."""
        dx = max(other.x - (self.x + self.w), self.x - (other.x + other.w))
        dy = max(other.y - (self.y + self.h), self.y - (other.y + other.h))
        return max(dx, dy)

    def contains(self, other: "Box") -> bool:
        return (self.x <= other.x and self.y <= other.y and other.x + other.w <= self.x + self.w
                and other.y + other.h <= self.y + self.h)


def node_title(node: Mapping, spec) -> str:
    if node.get("title"):
        return str(node["title"])
    if spec is not None:
        return spec.display_name
    return {"MarkdownNote": "Markdown Note"}.get(node.get("type"), str(node.get("type")))


def _slot_label(name: str) -> str:
    return str(name or "")


def estimated_size(node: Mapping, spec) -> tuple:
    """(width, height) the frontend may give `node` at least, title bar excluded, estimated from above."""
    title = node_title(node, spec)
    width = text_width(title, TITLE_PX) + 40
    if node.get("type") in NOTE_TYPES:
        return max(width, 210), 100                    # the text box (min 60) + margins; measured 88
    if spec is None:
        return width, SLOT_HEIGHT + 6
    widgets = spec.widget_inputs
    sockets = [i for i in spec.inputs.values() if not i.is_widget]
    ins = max((text_width(_slot_label(i.name), LABEL_PX) for i in sockets), default=0)
    outs = max((text_width(_slot_label(n), LABEL_PX) for n in spec.output_names), default=0)
    widths = [width, ins + outs + 2 * SLOT_HEIGHT + 5, 140]      # LiteGraph.NODE_WIDTH is the least
    if widgets:
        widths.append(210)                                          # 1.5 x NODE_WIDTH with widgets
        labels = [i.name for i in widgets]
        labels += ["choose file to upload" for i in widgets if i.opts.get("image_upload")]
        labels += ["control after generate" for i in widgets if i.ui_extra_values and not i.opts.get("image_upload")]
        widths.append(max(text_width(t, LABEL_PX) for t in labels) + 104)
    rows = max(len(sockets), len(spec.outputs), 1)
    height = rows * SLOT_HEIGHT
    for w in widgets:
        height += _widget_height(w)
    height += 8 + 6 if widgets else 6
    return max(widths), height


def _widget_height(w: InputSpec) -> float:
    if w.type == "STRING" and w.opts.get("multiline"):
        return 64                                     # a text box (DOM widget, min 60) + spacing
    h = 24                                            # one widget row + spacing
    h += 24 * w.ui_extra_values if w.type in ("INT", "COMBO") and not w.opts.get("image_upload") else 0
    if w.opts.get("image_upload"):
        h += 24 + 224                                 # the upload button and the image preview
    return h


def is_collapsed(node: Mapping) -> bool:
    return bool((node.get("flags") or {}).get("collapsed"))


COLLAPSED_TITLE = 20            # litegraph draws a collapsed node's title cut to 20 characters


def collapsed_width(node: Mapping, spec) -> float:
    """A collapsed node is its title pill: title text + 2 title heights wide (litegraph's _collapsed_width)."""
    return text_width(node_title(node, spec), TITLE_PX) + 2 * TITLE_HEIGHT


def node_box(node: Mapping, spec=None, *, estimate: bool = True, expanded: bool = False) -> Box:
    """The rectangle a node covers on the canvas, title bar included (saved size, or the estimate if larger);
    a collapsed node covers its title pill only, unless `expanded` asks for the rectangle it opens into."""
    x, y = (list(node.get("pos") or [0, 0]) + [0, 0])[:2]
    if is_collapsed(node) and not expanded:
        return Box(float(x), float(y) - TITLE_HEIGHT, collapsed_width(node, spec), float(TITLE_HEIGHT))
    w, h = (list(node.get("size") or [0, 0]) + [0, 0])[:2]
    if estimate:
        ew, eh = estimated_size(node, spec)
        w, h = max(w, ew), max(h, eh)
    return Box(float(x), float(y) - TITLE_HEIGHT, float(w), float(h) + TITLE_HEIGHT)


def _group_box(group: Mapping) -> Optional[Box]:
    b = group.get("bounding")
    if isinstance(b, (list, tuple)) and len(b) == 4:
        return Box(*map(float, b))
    return None


def _label(node, spec) -> str:
    return f"node {node.get('id')} '{node_title(node, spec)}'"


def size_problems(ui: Mapping, specs: Mapping) -> list:
    out = []
    for node in ui.get("nodes") or []:
        spec = specs.get(node.get("type"))
        if is_collapsed(node) and len(node_title(node, spec)) > COLLAPSED_TITLE:
            out.append(f"{_label(node, spec)} is collapsed, and the frontend cuts a collapsed node's title to "
                       f"{COLLAPSED_TITLE} characters; give it a shorter title")
        ew, eh = estimated_size(node, spec)
        w, h = (list(node.get("size") or [0, 0]) + [0, 0])[:2]
        if w < ew:
            out.append(f"{_label(node, spec)}: saved width {w:g} is less than the {ew:.0f} px its title and "
                       f"widgets may need; the frontend widens it over its neighbours (widen it or shorten the "
                       f"title)")
        if h < eh:
            out.append(f"{_label(node, spec)}: saved height {h:g} is less than the {eh:.0f} px its widgets may "
                       f"need (make it taller)")
    return out


def overlap_problems(ui: Mapping, specs: Mapping, gap: float = GAP) -> list:
    """Pairs of nodes closer than `gap` (overlapping rectangles included), judged on their estimated sizes."""
    nodes = list(ui.get("nodes") or [])
    boxes = [node_box(n, specs.get(n.get("type"))) for n in nodes]
    out = []
    for i in range(len(nodes)):
        for j in range(i + 1, len(nodes)):
            d = boxes[i].gap_to(boxes[j])
            if d < gap:
                a, b = nodes[i], nodes[j]
                what = f"overlap by {-d:.0f} px" if d < 0 else f"are only {d:.0f} px apart (keep {gap:g})"
                out.append(f"{_label(a, specs.get(a.get('type')))} and {_label(b, specs.get(b.get('type')))} {what}")
    # a collapsed node opens with one click: the rectangle it opens into must be free too
    for i, node in enumerate(nodes):
        if not is_collapsed(node):
            continue
        spec = specs.get(node.get("type"))
        opened = node_box(node, spec, expanded=True)
        for j, other in enumerate(nodes):
            if j != i and opened.gap_to(boxes[j]) < gap:
                out.append(f"{_label(node, spec)} is collapsed; expanded it would cover or touch "
                           f"{_label(other, specs.get(other.get('type')))} (keep the space it opens into free)")
    return out


def group_problems(ui: Mapping, specs: Mapping) -> list:
    """Groups must not overlap; a node is inside a group or outside it, never across its border or title."""
    groups = [(g, _group_box(g)) for g in ui.get("groups") or []]
    out = [f"group '{g.get('title')}' has no bounding [x, y, w, h]" for g, b in groups if b is None]
    groups = [(g, b) for g, b in groups if b is not None]
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            if groups[i][1].gap_to(groups[j][1]) < 0:
                out.append(f"groups '{groups[i][0].get('title')}' and '{groups[j][0].get('title')}' overlap")
    for node in ui.get("nodes") or []:
        spec = specs.get(node.get("type"))
        box = node_box(node, spec)
        for g, gb in groups:
            inner = Box(gb.x, gb.y + GROUP_TITLE, gb.w, gb.h - GROUP_TITLE)
            if box.gap_to(gb) < 0 and not inner.contains(box):
                out.append(f"{_label(node, spec)} sits across the border or title of group '{g.get('title')}' "
                           f"(move it inside or out, or resize the group)")
    return out


def _titles_outside(ui: Mapping, specs: Mapping, ds: Mapping, safe) -> list:
    """(what, screen rectangle) of every title bar that the view `ds` puts outside `safe`."""
    scale, (ox, oy) = float(ds["scale"]), ds["offset"]
    out = []
    for what, (bx0, by0, bx1, by1) in title_bars(ui, specs):
        x0, y0, x1, y1 = (bx0 + ox) * scale, (by0 + oy) * scale, (bx1 + ox) * scale, (by1 + oy) * scale
        if x0 < safe[0] or y0 < safe[1] or x1 > safe[2] or y1 > safe[3]:
            out.append((what, f"({x0:.0f}, {y0:.0f})-({x1:.0f}, {y1:.0f})"))
    return out


def first_view_problems(ui: Mapping, specs: Mapping, viewport=VIEWPORT, safe=SAFE) -> list:
    """The saved view (``extra.ds``) must show every node's title clear of the chrome, at a readable zoom."""
    ds = (ui.get("extra") or {}).get("ds")
    if not isinstance(ds, Mapping) or "scale" not in ds or "offset" not in ds:
        return ["no saved view (extra.ds): save one that shows every node's title (python -m tunelab workflows --fit-view)"]
    out = []
    if float(ds["scale"]) < MIN_SCALE:
        out.append(f"saved zoom {float(ds['scale']):g} is below {MIN_SCALE}, where the frontend draws nodes as blank "
                   f"boxes; arrange the graph smaller, in groups, or split it")
    for what, rect in _titles_outside(ui, specs, ds, safe):
        out.append(f"{what}: title at {rect} in a {viewport[0]}x{viewport[1]} window is not inside the area the "
                   f"chrome leaves free {safe}; re-save the view (python -m tunelab workflows --fit-view)")
    return out


def template_view(ui: Mapping, specs: Mapping, viewport=VIEWPORT) -> dict:
    """The view comfyui-frontend 1.58 opens a workflow from the template browser with, whatever ``extra.ds``
    says: the bounds of every node (title bars included, collapsed nodes as their pill) padded by 10 px, centred
    in 75% of the window (``useLitegraphService().fitView`` -> ``DragAndScale.fitToBounds``; groups are ignored)."""
    boxes = [node_box(n, specs.get(n.get("type"))) for n in ui.get("nodes") or []]
    if not boxes:
        return {"scale": 1.0, "offset": [0.0, 0.0]}
    x0, y0 = min(b.x for b in boxes) - FIT_PAD, min(b.y for b in boxes) - FIT_PAD
    w = max(b.x + b.w for b in boxes) + FIT_PAD - x0
    h = max(b.y + b.h for b in boxes) + FIT_PAD - y0
    scale = min(FIT_FRACTION * viewport[0] / max(w, 300), FIT_FRACTION * viewport[1] / max(h, 300), 10.0)
    return {"scale": scale, "offset": [viewport[0] / 2 / scale - x0 - w / 2, viewport[1] / 2 / scale - y0 - h / 2]}


def template_view_problems(ui: Mapping, specs: Mapping, viewport=VIEWPORT, safe=SAFE) -> list:
    """Opened from the template browser on the newer frontend, the fitted view must be readable too."""
    ds = template_view(ui, specs, viewport)
    out = []
    if ds["scale"] < MIN_SCALE:
        w, h = (FIT_FRACTION * side / MIN_SCALE - 2 * FIT_PAD for side in viewport)
        out.append(f"opened from the template browser, frontend 1.58 fits every node at zoom {ds['scale']:.2f}, "
                   f"below {MIN_SCALE} (blank boxes): keep the nodes within about {w:.0f} x {h:.0f} px "
                   f"(rearrange, collapse a tall node, or split the workflow)")
    for what, rect in _titles_outside(ui, specs, ds, safe):
        out.append(f"{what}: opened from the template browser (frontend 1.58 fits every node), its title is at "
                   f"{rect}, not inside the area the chrome leaves free {safe}; keep group titles level with the "
                   f"top node's title")
    return out


def title_bars(ui: Mapping, specs: Mapping) -> list:
    """(what, (x0, y0, x1, y1)) in graph units for every node's and group's title text."""
    bars = []
    for node in ui.get("nodes") or []:
        spec = specs.get(node.get("type"))
        box = node_box(node, spec)
        title_w = box.w if is_collapsed(node) else min(box.w, text_width(node_title(node, spec), TITLE_PX) + 40)
        bars.append((_label(node, spec), (box.x, box.y, box.x + title_w, box.y + TITLE_HEIGHT)))
    for g in ui.get("groups") or []:
        gb = _group_box(g)
        if gb is not None:
            size = float(g.get("font_size") or 24)
            title_w = min(gb.w, text_width(g.get("title") or "", size) + 20)
            bars.append((f"group '{g.get('title')}'", (gb.x, gb.y, gb.x + title_w, gb.y + GROUP_TITLE)))
    return bars


def fit_view(ui: Mapping, specs: Mapping, viewport=VIEWPORT, safe=SAFE, max_scale: float = 1.0) -> dict:
    """The ``extra.ds`` that puts every node's title inside `safe` at the largest zoom up to `max_scale`."""
    boxes = [b for _, b in title_bars(ui, specs)]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    scale = min(max_scale, (safe[2] - safe[0] - 20) / max(x1 - x0, 1), (safe[3] - safe[1] - 20) / max(y1 - y0, 1))
    scale = float(int(scale * 100) / 100)
    return {"scale": scale, "offset": [round((safe[0] + 10) / scale - x0, 1), round((safe[1] + 10) / scale - y0, 1)]}


_NOTE_NEEDS = (
    (re.compile(r"models/\w+"), "which model files go in which models folder (models/...)"),
    (re.compile(r"\btiny-"), "that the tiny-* presets exist for a first run"),
    (re.compile(r"\boutput/"), "what the result is and where it is saved (output/...)"),
)


def note_text(ui: Mapping) -> str:
    texts = []
    for node in ui.get("nodes") or []:
        if node.get("type") in NOTE_TYPES:
            texts += [v for v in node.get("widgets_values") or [] if isinstance(v, str)]
    return "\n".join(texts)


def note_problems(ui: Mapping) -> list:
    if not any(n.get("type") in NOTE_TYPES for n in ui.get("nodes") or []):
        return ["no guidance note: add a Note or MarkdownNote saying which models go where (models/...), that "
                "the tiny-* presets exist for a first run, and what the result is and where it is saved (output/...)"]
    text = note_text(ui)
    return [f"the guidance note does not say {why}" for rx, why in _NOTE_NEEDS if not rx.search(text)]


def model_hint_problems(ui: Mapping, specs: Mapping) -> list:
    """Loader widgets holding a model file name need ``properties.models`` ({name, directory, url}) so the
    frontend's missing-models dialog can say where to download it and which models folder it goes in."""
    out = []
    for node in ui.get("nodes") or []:
        spec = specs.get(node.get("type"))
        if spec is None or node.get("type") in VIRTUAL_NODES:
            continue
        values = node.get("widgets_values")
        if not isinstance(values, list):
            continue
        hints = {m.get("name"): m for m in (node.get("properties") or {}).get("models") or [] if isinstance(m, Mapping)}
        for w in spec.widget_inputs:
            if not w.file_kinds or w.file_kinds == ("input",):
                continue
            for value in values:
                if not (isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS)) or value in w.choices:
                    continue
                hint = hints.get(value)
                if hint is None:
                    out.append(f"{_label(node, spec)}: '{value}' has no entry in properties.models "
                               f"(name, directory, url) for the missing-models dialog")
                elif hint.get("directory") not in w.file_kinds:
                    out.append(f"{_label(node, spec)}: properties.models gives '{value}' directory "
                               f"'{hint.get('directory')}', but {w.name} lists {', '.join(w.file_kinds)}")
                elif not str(hint.get("url", "")).startswith("https://"):
                    out.append(f"{_label(node, spec)}: properties.models entry for '{value}' needs an https url")
            break  # a node's model hints are judged once, against its first file widget
    return out


def advanced_value_problems(ui: Mapping, specs: Mapping) -> list:
    """A widget flagged ``advanced`` (folded away by frontends that fold advanced inputs) must hold its default:
    what a workflow sets must stay in view."""
    out = []
    for node in ui.get("nodes") or []:
        spec = specs.get(node.get("type"))
        if spec is None or node.get("type") in VIRTUAL_NODES:
            continue
        try:
            values = ui_widget_values(node, spec)
        except WorkflowError:
            continue  # reported by validation
        for w in spec.widget_inputs:
            folded = w.opts.get("advanced") and "default" in w.opts and w.name in values
            if folded and values[w.name] != w.opts["default"]:
                out.append(f"{_label(node, spec)}: {w.name} = {values[w.name]!r} differs from its default "
                           f"{w.opts['default']!r}, but {w.name} is an advanced input that newer frontends fold "
                           f"away; keep the default or show {w.name} (nodes/*.py)")
    return out


def thumbnail_problems(path: Path) -> list:
    """The template browser's card picture `<name>.jpg`: present, a JPEG, of sensible size, not a blank."""
    path = Path(path)
    if not path.is_file():
        return [f"no thumbnail {path.name} (run: python tools/workflow_shots.py --thumbnails, see README)"]
    size = path.stat().st_size
    if size > THUMB_MAX_BYTES:
        return [f"thumbnail {path.name} is {size // 1000} KB; keep it under {THUMB_MAX_BYTES // 1000} KB"]
    from PIL import Image, ImageStat, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            fmt, (w, h) = im.format, im.size
            im.load()
            spread = max(ImageStat.Stat(im.convert("L")).stddev)
    except (OSError, UnidentifiedImageError) as e:
        return [f"thumbnail {path.name} is not a readable image ({e})"]
    out = []
    if fmt != "JPEG":
        out.append(f"thumbnail {path.name} is {fmt}, not JPEG")
    if not (THUMB_MIN <= w <= THUMB_MAX and THUMB_MIN <= h <= THUMB_MAX):
        out.append(f"thumbnail {path.name} is {w}x{h}; keep each side within {THUMB_MIN}..{THUMB_MAX} px")
    if spread < 8:
        out.append(f"thumbnail {path.name} is nearly one flat colour (a placeholder, not a picture)")
    return out


def layout_problems(ui: Mapping, specs: Mapping) -> list:
    """Every readability rule for one UI-format workflow; [] when a person can read it at a glance."""
    ui_links(ui)  # malformed links fail here, as in validation
    return (size_problems(ui, specs) + overlap_problems(ui, specs) + group_problems(ui, specs)
            + first_view_problems(ui, specs) + template_view_problems(ui, specs) + note_problems(ui)
            + model_hint_problems(ui, specs) + advanced_value_problems(ui, specs))
