"""Open every workflow in the real ComfyUI frontend: check what a user sees, take screenshots, make thumbnails.

    python tools/workflow_shots.py --comfyui /path/to/ComfyUI [--front-end-root DIR] [--shots DIR] [--thumbnails]

For each ``workflows/<name>.json`` (generic over the folder) this starts ComfyUI with the pack linked through a
temporary custom_nodes folder, drives a headless Chromium over the DevTools protocol and

- opens the template browser (sidebar -> Templates -> the pack's category), checks that the card of `<name>`
  shows its thumbnail, and opens the workflow by clicking its card, as a user does;
- checks that the frontend's own API export (``app.graphToPrompt()``) equals ``workflows/api/<name>.json``;
- measures, from the frontend's own graph objects after it has sized the nodes, whether any two node rectangles
  (title bar included) overlap, also with its collapsed nodes opened, and whether every node's title is on screen
  and drawn (not in low-detail mode) and not under the frontend's chrome (tabs, workflow-name chip, sidebar,
  toasts: the point must hit the canvas itself);
- with ``--shots DIR``: saves the template browser and the first view of each workflow as JPEG;
- with ``--thumbnails``: renders each graph at 100% zoom on a large page and writes ``workflows/<name>.jpg``
  (the template browser's card picture), a square JPEG of THUMB px.

Prints one line per workflow and exits 1 if any check fails. Needs: a ComfyUI checkout (its .venv is used when
present), Chromium (``apt-get install chromium``), websocket-client and pillow (the pack's ``headless`` extra).
The missing-models dialog that opens for workflows whose models are absent is closed (Escape) and reported.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import BrowserError, chromium, comfyui_server  # noqa: E402

PACK = Path(__file__).resolve().parent.parent
CATEGORY = "tunelab"          # the pack's folder name under custom_nodes = its template category
THUMB = 448                   # thumbnail side in px (the cards show a square)
BACKGROUND = (32, 32, 32)

# Finds a visible element whose text or aria-label is exactly `t`, scrolls it into view, returns its centre.
FIND = """(t => { const els = Array.from(document.querySelectorAll('button,[role=button],a,li,h3,div,span'))
  .filter(e => ((e.textContent||'').trim() === t || e.getAttribute('aria-label') === t) && e.getClientRects().length);
  const e = els[els.length - 1]; if (!e) return null; e.scrollIntoView({block: 'center'});
  const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })"""

# The picture on the card of workflow `name` (cards hold blob: URLs, so find it from the card's title). The card is
# the largest ancestor of its title that holds no other card's title: a card still loading its picture must not
# report its neighbour's. Returns {} for a card without a picture.
CARD_IMAGE = """((name, names) => { const leaves = Array.from(document.querySelectorAll('h3,h4,span,div,p'))
  .filter(e => e.childElementCount === 0 && names.includes((e.textContent || '').trim()) && e.getClientRects().length);
  const t = leaves.find(e => (e.textContent || '').trim() === name); if (!t) return null;
  let card = t; while (card.parentElement && leaves.filter(l => card.parentElement.contains(l)).length === 1) card = card.parentElement;
  const img = card.querySelector('img'); if (!img) return {};
  return {src: img.src.slice(0, 80), w: img.naturalWidth, h: img.naturalHeight, done: img.complete}; })"""
PLACEHOLDER = "default-template"  # the frontend's stand-in picture for a card whose <name>.jpg is missing

# Node rectangles (title bar included) and title visibility, from the frontend's own objects.
MEASURE = """(() => {
  const c = app.canvas, ds = c.ds, el = c.canvas, box = el.getBoundingClientRect();
  const TH = (window.LiteGraph && LiteGraph.NODE_TITLE_HEIGHT) || 30;
  const ctx = el.getContext('2d');
  // below this zoom the frontend draws nodes as boxes without text (LiteGraph.Canvas.MinFontSizeForLOD, 8 px)
  const minFont = app.extensionManager?.setting?.get?.('LiteGraph.Canvas.MinFontSizeForLOD') ?? 8;
  const lowDetail = typeof c.low_quality === 'boolean' ? c.low_quality : (minFont > 0 && 14 * ds.scale < minFont);
  const toScreen = (x, y) => [box.x + (x + ds.offset[0]) * ds.scale, box.y + (y + ds.offset[1]) * ds.scale];
  const nodes = app.graph._nodes.map(n => {
    const collapsed = !!(n.flags && n.flags.collapsed);
    const w = collapsed ? (n._collapsed_width || 80) : n.size[0], h = collapsed ? 0 : n.size[1];
    ctx.font = n.titleFontStyle || '14px Arial';
    const title = n.getTitle ? n.getTitle() : n.title;
    const tw = ctx.measureText(title || '').width;
    // points along the title text: each must be inside the window and hit the canvas itself
    const pts = [];
    for (let t = 0; t <= 1.0001; t += 0.125) pts.push(toScreen(n.pos[0] + TH * 0.75 + t * Math.min(tw, w - TH), n.pos[1] - TH / 2));
    const hidden = pts.filter(([x, y]) => x < 0 || y < 0 || x >= innerWidth || y >= innerHeight || document.elementFromPoint(x, y) !== el);
    const cover = hidden.slice(0, 1).map(([x, y]) => { const e = document.elementFromPoint(x, y);
      return e ? (e.tagName + '.' + String(e.className).split(' ').slice(0, 2).join('.')) : 'outside the window'; });
    return {id: n.id, type: n.type, title, computed: n.computeSize ? Array.from(n.computeSize()) : null, x: n.pos[0], y: n.pos[1] - TH, w, h: h + TH, title_width: tw,
            title_visible: hidden.length === 0 && !lowDetail,
            covered_by: cover[0] || (lowDetail ? 'low-detail rendering at this zoom' : null)};
  });
  const overlaps = [];
  for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
    const a = nodes[i], b = nodes[j];
    const ox = Math.min(a.x + a.w, b.x + b.w) - Math.max(a.x, b.x), oy = Math.min(a.y + a.h, b.y + b.h) - Math.max(a.y, b.y);
    if (ox > 0 && oy > 0) overlaps.push({a: a.id, b: b.id, dx: ox, dy: oy});
  }
  return {version: window.__COMFYUI_FRONTEND_VERSION__, scale: ds.scale, low_detail: lowDetail, offset: Array.from(ds.offset),
          viewport: [innerWidth, innerHeight], nodes, overlaps,
          workflow: app.extensionManager?.workflow?.activeWorkflow?.filename || null};
})()"""

GRAPH_BOUNDS = """(() => { const TH = (window.LiteGraph && LiteGraph.NODE_TITLE_HEIGHT) || 30; let b = [1e9, 1e9, -1e9, -1e9];
  for (const n of app.graph._nodes) { const folded = !!(n.flags && n.flags.collapsed);
    const w = folded ? (n._collapsed_width || 80) : n.size[0], h = folded ? 0 : n.size[1];
    b = [Math.min(b[0], n.pos[0]), Math.min(b[1], n.pos[1] - TH), Math.max(b[2], n.pos[0] + w), Math.max(b[3], n.pos[1] + h)]; }
  for (const g of app.graph._groups || []) { const r = g._bounding || g.bounding; b = [Math.min(b[0], r[0]),
    Math.min(b[1], r[1]), Math.max(b[2], r[0] + r[2]), Math.max(b[3], r[1] + r[3])]; }
  return b; })()"""


# Collapsed nodes open with one click: open them, read every node rectangle, and fold them again. Returns the
# opened nodes (size and computeSize while open) and the pairs that overlap while they are open.
EXPANDED = """(() => { const TH = (window.LiteGraph && LiteGraph.NODE_TITLE_HEIGHT) || 30;
  const folded = app.graph._nodes.filter(n => n.flags && n.flags.collapsed); if (!folded.length) return {opened: [], overlaps: []};
  folded.forEach(n => n.collapse()); const r = app.graph._nodes.map(n => { const c = !!(n.flags && n.flags.collapsed);
    return {id: n.id, x: n.pos[0], y: n.pos[1] - TH, w: c ? (n._collapsed_width || 80) : n.size[0], h: (c ? 0 : n.size[1]) + TH,
            opened: folded.includes(n), computed: folded.includes(n) ? Array.from(n.computeSize()) : null}; });
  folded.forEach(n => n.collapse()); app.canvas.setDirty(true, true);
  const out = []; for (const a of r) if (a.opened) for (const b of r) { if (b === a) continue;
    const ox = Math.min(a.x + a.w, b.x + b.w) - Math.max(a.x, b.x), oy = Math.min(a.y + a.h, b.y + b.h) - Math.max(a.y, b.y);
    if (ox > 0 && oy > 0) out.push({a: a.id, b: b.id, dx: ox, dy: oy, size: [a.w, a.h - TH]}); }
  return {opened: r.filter(a => a.opened).map(a => ({id: a.id, size: [a.w, a.h - TH], computed: a.computed})), overlaps: out}; })()"""


def workflow_names(folder: Path) -> list:
    return [p.stem for p in sorted(Path(folder).glob("*.json"))]


def close_dialogs(page, rounds: int = 4) -> list:
    """Close what pops up over the canvas, as a user would: dialogs (the missing-models dialog) with Escape,
    toasts and status panels ("... is missing") with their Close button. Returns their first lines."""
    seen = []
    for _ in range(rounds):
        headers = page.js("Array.from(document.querySelectorAll('[role=dialog]')).filter(d => d.getClientRects().length)"
                          ".map(d => (d.innerText || '').trim().split('\\n')[0].slice(0, 80))")
        toasts = page.js("""Array.from(document.querySelectorAll('[role=status],[role=alert]'))
          .filter(t => t.getClientRects().length).map(t => { const b = Array.from(t.querySelectorAll('button'))
            .find(b => /close|dismiss/i.test(b.getAttribute('aria-label') || ''));
            if (!b) return null; const r = b.getBoundingClientRect();
            return [(t.innerText || '').trim().split('\\n')[0].slice(0, 80), r.x + r.width / 2, r.y + r.height / 2]; })
          .filter(Boolean)""")
        if not headers and not toasts:
            break
        seen += headers + [t[0] for t in toasts]
        if headers:
            page.send("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
            page.send("Input.dispatchKeyEvent", type="keyUp", key="Escape", code="Escape", windowsVirtualKeyCode=27)
        for _, x, y in toasts:
            page.click(x, y)
        time.sleep(0.7)
    return seen


def wait_for_app(page, url: str):
    page.goto(url)
    page.wait_js("!!(window.app && app.graph && app.canvas && document.querySelector('canvas'))", 120, "the ComfyUI app")
    page.wait_js(FIND + "('Templates')", 60, "the Templates button")
    time.sleep(2)
    close_dialogs(page)
    # a new user's first visit opens the template browser itself; later visits do not
    page.js("app.extensionManager?.setting?.set?.('Comfy.Minimap.Visible', false)")


def open_category(page):
    """Sidebar -> Templates -> the pack's category (clicks, retried while the dialog is still starting)."""
    for _ in range(5):
        if not page.js(FIND + f"('{CATEGORY}')"):
            xy = page.js(FIND + "('Templates')")
            if xy:
                page.click(*xy)
            time.sleep(2)
        xy = page.js(FIND + f"('{CATEGORY}')")
        if xy:
            page.click(*xy)
            time.sleep(2)
            return
    raise BrowserError(f"the template browser shows no '{CATEGORY}' category")


def open_from_templates(page, name: str, expected_nodes: int, dialog_shot=None, names=()) -> dict:
    """Open `name` by clicking its card; return the card's picture as the browser loaded it."""
    open_category(page)
    card = page.wait_js(FIND + f"('{name}')", 30, f"the card of {name}")
    image = None
    for _ in range(20):  # the browser fetches card pictures lazily
        image = page.js(CARD_IMAGE + f"({json.dumps(name)}, {json.dumps(sorted(set(names) | {name}))})")
        if image and image.get("done") and image.get("w") and PLACEHOLDER not in image["src"]:
            break
        time.sleep(0.5)
    page.click(*card)
    page.wait_js(f"app.graph._nodes.length === {expected_nodes} && "
                 f"(app.extensionManager?.workflow?.activeWorkflow?.filename || '{name}') === '{name}'", 60,
                 f"{name} on the canvas")
    time.sleep(2)  # the frontend sizes nodes and lays out DOM widgets after configure
    if dialog_shot and page.js("document.querySelectorAll('[role=dialog]').length"):
        page.screenshot(dialog_shot, quality=75)
    return {"image": image, "dialogs": close_dialogs(page)}


def prompt_differences(page, twin: Path) -> list:
    """Where the frontend's own export of the open graph (``app.graphToPrompt()``) differs from the API twin."""
    if not twin.is_file():
        return [f"no API twin {twin.name}"]
    mine = page.js("app.graphToPrompt().then(p => p.output)")
    want = json.loads(twin.read_text())
    out = []
    for node_id in sorted(set(mine) | set(want)):
        a, b = mine.get(node_id), want.get(node_id)
        if a is None or b is None:
            out.append(f"API node {node_id} only in {'the twin' if a is None else 'the frontend export'}")
        elif a.get("class_type") != b.get("class_type") or a.get("inputs") != b.get("inputs"):
            out.append(f"API node {node_id}: the frontend exports {a.get('inputs')}, the twin has {b.get('inputs')}")
    return out


def thumb_label(img) -> str:
    if not img or not img.get("w"):
        return "none"
    return "placeholder" if PLACEHOLDER in img["src"] else f"{img['w']}x{img['h']}"


def check_view(name: str, m: dict, card: dict) -> list:
    problems = []
    img = card.get("image")
    if not img or not img.get("w"):
        problems.append("the card shows no thumbnail" + (f" ({img['src']} did not load)" if img else ""))
    elif PLACEHOLDER in img["src"]:
        problems.append(f"the card shows the frontend's placeholder ({img['src']}): no {name}.jpg")
    for o in m["overlaps"]:
        problems.append(f"nodes {o['a']} and {o['b']} overlap by {o['dx']:.0f} x {o['dy']:.0f} px")
    for o in (m.get("expanded") or {}).get("overlaps") or []:
        problems.append(f"collapsed node {o['a']}, once expanded ({o['size'][0]:.0f} x {o['size'][1]:.0f}), overlaps "
                        f"node {o['b']} by {o['dx']:.0f} x {o['dy']:.0f} px")
    for n in m["nodes"]:
        if not n["title_visible"]:
            problems.append(f"node {n['id']} '{n['title']}': title not visible (under {n['covered_by']})")
    return problems


def thumbnail(page, path: Path, margin: int = 480):
    """Render the graph at 100% zoom on a page large enough to hold it away from the chrome; save a square JPEG."""
    from PIL import Image

    x0, y0, x1, y1 = page.js(GRAPH_BOUNDS)
    w, h = int(x1 - x0) + 40, int(y1 - y0) + 40
    page.viewport(w + 2 * margin, h + 2 * margin)
    time.sleep(1)
    page.js(f"(() => {{ const ds = app.canvas.ds; ds.scale = 1; ds.offset[0] = {margin + 20 - x0}; "
            f"ds.offset[1] = {margin + 20 - y0}; app.canvas.setDirty(true, true); app.canvas.draw(true, true); }})()")
    time.sleep(1.5)
    shot = page.send("Page.captureScreenshot", format="png",
                     clip={"x": margin, "y": margin, "width": w, "height": h, "scale": 1})["data"]
    import base64

    graph = Image.open(io.BytesIO(base64.b64decode(shot))).convert("RGB")
    side = max(graph.size)
    square = Image.new("RGB", (side, side), BACKGROUND)
    square.paste(graph, ((side - graph.width) // 2, (side - graph.height) // 2))
    square = square.resize((THUMB, THUMB), Image.LANCZOS)
    buf = io.BytesIO()
    square.save(buf, "JPEG", quality=82, optimize=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return len(buf.getvalue())


def run(args) -> int:
    folder = Path(args.workflows)
    all_names = workflow_names(folder)
    names = [n for n in all_names if not args.only or n in args.only]
    counts = {n: len(json.loads((folder / f"{n}.json").read_text())["nodes"]) for n in names}
    failures, report = 0, {}
    shots = Path(args.shots) if args.shots else None
    with comfyui_server(args.comfyui, PACK, front_end_root=args.front_end_root) as url, \
            chromium(args.chromium, width=args.width, height=args.height) as page:
        wait_for_app(page, url)
        version = page.js("window.__COMFYUI_FRONTEND_VERSION__")
        print(f"frontend {version} at {url}, viewport {args.width}x{args.height}")
        tag = f"fe{version}"
        for name in names:
            page.viewport(args.width, args.height)
            card = open_from_templates(page, name, counts[name],
                                       shots / f"{tag}-{name}-dialog.jpg" if shots else None, names=all_names)
            m = page.js(MEASURE)
            m["expanded"] = page.js(EXPANDED)
            problems = check_view(name, m, card) + prompt_differences(page, folder / "api" / f"{name}.json")
            failures += bool(problems)
            report[name] = {"measure": m, "card": card, "problems": problems}
            hidden = sum(not n["title_visible"] for n in m["nodes"])
            print(f"{'FAIL' if problems else 'ok  '} {name}: {len(m['nodes'])} nodes, {len(m['overlaps'])} "
                  f"overlap(s), {hidden} title(s) hidden, zoom {m['scale']:.2f}, thumbnail "
                  f"{thumb_label(card['image'])}"
                  f"{', closed: ' + '; '.join(card['dialogs']) if card['dialogs'] else ''}")
            for p in problems:
                print(f"     {p}")
            if shots:
                page.screenshot(shots / f"{tag}-{name}.jpg", quality=75)
            if args.thumbnails:
                size = thumbnail(page, folder / f"{name}.jpg")
                print(f"     wrote {folder / (name + '.jpg')} ({size // 1024} KB)")
                page.viewport(args.width, args.height)
        if shots:
            page.viewport(args.width, args.height)
            open_category(page)
            time.sleep(2)
            page.screenshot(shots / f"{tag}-template-browser.jpg", quality=75)
            (shots / f"{tag}-report.json").write_text(json.dumps(report, indent=1))
    print(f"{len(names)} workflow(s), {failures} with problems")
    return 1 if failures else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (default $COMFYUI_PATH)")
    ap.add_argument("--front-end-root", help="serve this frontend build (a comfyui-frontend-package's static/ folder)")
    ap.add_argument("--workflows", default=str(PACK / "workflows"), help="folder of UI-format workflows")
    ap.add_argument("--shots", help="save screenshots and a JSON report here")
    ap.add_argument("--thumbnails", action="store_true", help="(re)write workflows/<name>.jpg from the graph")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these workflows (file names without .json)")
    ap.add_argument("--chromium", help="Chromium binary (default: chromium on PATH, or $CHROMIUM)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=800)
    args = ap.parse_args(argv)
    if not args.comfyui:
        ap.error("--comfyui (or COMFYUI_PATH) is required")
    try:
        return run(args)
    except BrowserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
