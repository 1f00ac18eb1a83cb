"""`python -m tunelab workflows [--check]`: validate the shipped workflows and (re)write their API twins.

For every UI-format `workflows/<name>.json` this validates it against the pack's node classes and ComfyUI's core
nodes, converts it to API format and writes `workflows/api/<name>.json`. It also applies the readability rules of
`core.workflow_layout` (node sizes against the frontend's, no overlapping rectangles, groups, a first view that
shows every title, a guidance note, model hints for the missing-models dialog) and checks the template browser's
thumbnail `workflows/<name>.jpg`. With `--check` nothing is written: it exits 1 when any of that fails, a twin is
missing or stale, or a twin or thumbnail has no UI file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

WORKFLOWS_DIR = Path(__file__).resolve().parent.parent / "workflows"


def add_arguments(parser) -> None:
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a workflow is invalid or hard to read, its thumbnail is missing, or an "
                             "API twin is missing or stale")
    parser.add_argument("--fit-view", action="store_true",
                        help="also rewrite each UI workflow's saved view (extra.ds) so that every node's title shows "
                             "in a 1280x800 window, clear of the frontend's chrome")
    parser.add_argument("--dir", type=Path, default=WORKFLOWS_DIR,
                        help="the folder of UI-format workflows (default: the pack's workflows/); twins go in DIR/api")


def pack_specs():
    """Node schemas of every TuneLab node (from NODE_CLASS_MAPPINGS) plus the core nodes workflows may use."""
    from .. import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, host
    from ..core import workflow

    return workflow.node_specs(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, host=host)


def dump(graph) -> str:
    return json.dumps(graph, indent=2, ensure_ascii=False) + "\n"


def load(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from None


def run(args) -> int:
    from ..core import files, workflow, workflow_layout

    files.check_input_dir(args.dir, "dir", what="workflows folder")
    specs = pack_specs()
    folder = Path(args.dir)
    api_dir = folder / "api"
    ui_files = sorted(folder.glob("*.json"))
    problems, written, current = [], [], 0
    for path in ui_files:
        try:
            ui = load(path)
        except ValueError as e:
            problems.append(str(e))
            continue
        if not workflow.is_ui_format(ui):
            problems.append(f"{path.name}: not a UI-format workflow (API files belong in {api_dir.name}/)")
            continue
        errors = workflow.validate(ui, specs=specs)
        problems += [f"{path.name}: {e}" for e in errors]
        if errors:
            continue
        if getattr(args, "fit_view", False) and not args.check:
            view = workflow_layout.fit_view(ui, specs)
            if (ui.get("extra") or {}).get("ds") != view:
                ui.setdefault("extra", {})["ds"] = view
                files.write_text_atomic(path, dump(ui))
                written.append(path)
        problems += [f"{path.name}: {e}" for e in workflow_layout.layout_problems(ui, specs)]
        problems += [f"{path.name}: {e}" for e in workflow_layout.thumbnail_problems(path.with_suffix(".jpg"))]
        text = dump(workflow.ui_to_api(ui, specs=specs))
        twin = api_dir / path.name
        old = twin.read_text(encoding="utf-8") if twin.is_file() else None
        if old is not None and json.loads(old) == json.loads(text):
            current += 1
        elif args.check:
            problems.append(f"{path.name}: API twin {'is stale' if old is not None else 'is missing'} "
                            f"(run: python -m tunelab workflows)")
        else:
            files.write_text_atomic(twin, text)
            written.append(twin)
    for thumb in sorted(folder.glob("*.jpg")):
        if not thumb.with_suffix(".json").is_file():
            problems.append(f"{thumb.name}: a thumbnail without a workflow {thumb.stem}.json")
    for twin in sorted(api_dir.glob("*.json")):
        if not (folder / twin.name).is_file():
            problems.append(f"api/{twin.name}: no UI-format workflow {twin.name} beside it")
        else:
            try:
                api = load(twin)
            except ValueError as e:
                problems.append(str(e))
                continue
            problems += [f"api/{twin.name}: {e}" for e in workflow.validate(api, specs=specs)]
    for p in written:
        print(f"wrote {p}")
    print(f"{len(ui_files)} workflow(s): {current} twin(s) up to date, {len(written)} written, "
          f"{len(problems)} problem(s)")
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    return 1 if problems else 0
