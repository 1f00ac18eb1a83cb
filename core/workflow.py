"""Workflow files: UI format -> API format, and a validator for both. Pure Python; never imports ComfyUI.

Two JSON shapes describe one ComfyUI graph:

- UI format (what the canvas saves, version 0.4): ``{"nodes": [{id, type, inputs: [{name, type, link}], outputs,
  widgets_values: [...]}], "links": [[id, src, src_slot, dst, dst_slot, TYPE]], ...}``. Widget values are
  positional and include frontend-only values (the ``control_after_generate`` mode after a seed).
- API format (what ``POST /prompt`` runs): ``{"<id>": {"inputs": {name: value | ["<src id>", slot]},
  "class_type": ..., "_meta": {"title": ...}}}``.

Node schemas come from two places, normalized into one `NodeSpec`: TuneLab's own classes (``INPUT_TYPES`` /
``RETURN_TYPES``, so new nodes are covered without a list to keep up to date) and `CORE_NODES`, the ComfyUI core
nodes a TuneLab workflow may use, written in the shape of ComfyUI's ``GET /object_info`` (0.8.0).
A test marked ``comfyui`` checks that table against a running server.

Combos whose choices are files on the machine (checkpoints, LoRAs, input images) cannot be checked against a list
that differs per machine. They are marked (`files`), and the validator accepts any relative file name for them; for
TuneLab classes the marks are found by asking the classes for their inputs while the pack's ``host.filename_list``
answers with marks instead of files.
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from .errors import TuneLabError

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# The frontend adds a "control after generate" widget after INT inputs that ask for one, and after INT inputs
# named like this when they do not say (comfyui-frontend 1.35, useIntWidget).
SEED_NAMES = ("seed", "noise_seed")
# Nodes that exist only in the frontend; the API export drops them.
VIRTUAL_NODES = ("Note", "MarkdownNote", "PrimitiveNode", "Reroute")
MODE_MUTED, MODE_BYPASS = 2, 4

_FILES_MARK = "\x00files:"


class WorkflowError(TuneLabError):
    """A workflow file that cannot be converted or run; the message names the node and input."""


def files(kind: str) -> list[str]:
    """A combo choice list standing for "the files of this model folder on the machine that runs it"."""
    return [_FILES_MARK + kind]


# --------------------------------------------------------------------------------------------------------------
# Node schemas
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str                       # INT, FLOAT, STRING, BOOLEAN, COMBO, or a socket type such as IMAGE
    options: tuple = ()             # combo choices
    opts: Mapping = field(default_factory=dict)
    required: bool = True

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.opts.get("forceInput")

    @property
    def file_kinds(self) -> tuple:
        """Model-folder kinds whose files this combo lists (empty for a fixed list)."""
        return tuple(o.split(_FILES_MARK, 1)[1] for o in self.options if isinstance(o, str) and _FILES_MARK in o)

    @property
    def choices(self) -> tuple:
        """The fixed combo choices (file-list marks left out)."""
        return tuple(o for o in self.options if not (isinstance(o, str) and _FILES_MARK in o))

    @property
    def ui_extra_values(self) -> int:
        """Frontend-only widgets_values that follow this input's value in a UI-format file."""
        extra = 0
        control = self.opts.get("control_after_generate")
        if self.type == "INT" and (control if control is not None else self.name in SEED_NAMES):
            extra += 1                  # the control mode ("fixed", "randomize", ...)
        elif self.type == "COMBO" and control:
            extra += 2                  # the control mode and its filter-list text
        if self.type == "COMBO" and (self.opts.get("image_upload") or self.opts.get("video_upload")):
            extra += 1                  # the "choose file to upload" button
        return extra


@dataclass(frozen=True)
class NodeSpec:
    class_type: str
    display_name: str
    inputs: Mapping[str, InputSpec]
    outputs: tuple
    output_names: tuple = ()
    output_node: bool = False

    @property
    def widget_inputs(self) -> list:
        return [i for i in self.inputs.values() if i.is_widget]

    @property
    def required_inputs(self) -> list:
        return [i for i in self.inputs.values() if i.required]


def _input_spec(name: str, entry, required: bool) -> InputSpec:
    entry = list(entry) if isinstance(entry, (list, tuple)) else [entry]
    kind = entry[0] if entry else "*"
    opts = dict(entry[1]) if len(entry) > 1 and isinstance(entry[1], Mapping) else {}
    if isinstance(kind, (list, tuple)):
        return InputSpec(name, "COMBO", tuple(kind), opts, required)
    if kind == "COMBO":
        return InputSpec(name, "COMBO", tuple(opts.get("options") or ()), opts, required)
    return InputSpec(name, str(kind), (), opts, required)


def _output_type(t) -> str:
    return "COMBO" if isinstance(t, (list, tuple)) else str(t)


def spec_from_object_info(class_type: str, info: Mapping) -> NodeSpec:
    """A NodeSpec from one entry of ComfyUI's ``GET /object_info`` (or `CORE_NODES`, which has the same shape)."""
    inputs = {}
    sections = info.get("input") or {}
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        entries = sections.get(section) or {}
        for name in order.get(section) or list(entries):
            inputs[name] = _input_spec(name, entries[name], section == "required")
    outputs = tuple(_output_type(t) for t in info.get("output") or ())
    return NodeSpec(class_type, info.get("display_name") or class_type, inputs, outputs,
                    tuple(info.get("output_name") or outputs), bool(info.get("output_node")))


def spec_from_class(class_type: str, cls, display_name: Optional[str] = None) -> NodeSpec:
    """A NodeSpec from a V1 node class (``INPUT_TYPES``, ``RETURN_TYPES``, ``RETURN_NAMES``, ``OUTPUT_NODE``)."""
    try:
        input_types = cls.INPUT_TYPES()
    except Exception as e:  # a node whose INPUT_TYPES fails is as broken as a missing one
        raise WorkflowError(f"{class_type}.INPUT_TYPES() failed: {e}") from e
    outputs = tuple(getattr(cls, "RETURN_TYPES", ()) or ())
    return spec_from_object_info(class_type, {
        "input": input_types, "output": outputs, "output_name": getattr(cls, "RETURN_NAMES", None) or outputs,
        "output_node": getattr(cls, "OUTPUT_NODE", False), "display_name": display_name or class_type})


@contextlib.contextmanager
def _file_marks(node_classes: Mapping, host):
    """While node classes list their inputs, make the pack's host answer file lists with marks."""
    hosts = []
    if host == "auto":
        for cls in node_classes.values():
            pkg = cls.__module__.rsplit(".nodes.", 1)[0] if ".nodes." in cls.__module__ else None
            mod = sys.modules.get(f"{pkg}.host") if pkg else None
            if mod is not None and hasattr(mod, "filename_list") and mod not in hosts:
                hosts.append(mod)
    elif host is not None:
        hosts.append(host)
    saved = [(h, h.filename_list) for h in hosts]
    try:
        for h in hosts:
            h.filename_list = files
        yield
    finally:
        for h, fn in saved:
            h.filename_list = fn


def node_specs(node_classes: Optional[Mapping] = None, display_names: Optional[Mapping] = None, *,
               host="auto", core: bool = True) -> dict:
    """class_type -> NodeSpec for the given node classes (e.g. TuneLab's NODE_CLASS_MAPPINGS) plus `CORE_NODES`.

    `host`: the module whose ``filename_list`` the classes call for machine-dependent lists ("auto": the
    ``host`` module of each class's package, if loaded; None: ask the classes as they are).
    """
    specs = {name: spec_from_object_info(name, info) for name, info in CORE_NODES.items()} if core else {}
    node_classes = dict(node_classes or {})
    with _file_marks(node_classes, host):
        for name, cls in node_classes.items():
            specs[name] = spec_from_class(name, cls, (display_names or {}).get(name))
    return specs


def _specs(node_classes, specs, display_names=None) -> dict:
    if specs is not None:
        return specs
    if node_classes and all(isinstance(v, NodeSpec) for v in node_classes.values()):
        return dict(node_classes)
    return node_specs(node_classes, display_names)


# --------------------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------------------

def is_ui_format(graph) -> bool:
    return isinstance(graph, Mapping) and isinstance(graph.get("nodes"), list) and "links" in graph


def is_api_format(graph) -> bool:
    return (isinstance(graph, Mapping) and bool(graph) and not is_ui_format(graph)
            and all(isinstance(v, Mapping) and "class_type" in v for v in graph.values()))


def is_link(value) -> bool:
    """An API-format input fed by another node: ``["<node id>", output slot]``."""
    return (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], (str, int))
            and not isinstance(value[0], bool) and isinstance(value[1], int) and not isinstance(value[1], bool))


@dataclass(frozen=True)
class UiLink:
    id: int
    src: Any
    src_slot: int
    dst: Any
    dst_slot: int
    type: Any


def ui_links(ui_graph: Mapping) -> dict:
    """link id -> UiLink, from the 0.4 array form or the object form of newer files."""
    out = {}
    for link in ui_graph.get("links") or []:
        if isinstance(link, Mapping):
            lk = UiLink(link.get("id"), link.get("origin_id"), link.get("origin_slot"), link.get("target_id"),
                        link.get("target_slot"), link.get("type"))
        elif isinstance(link, (list, tuple)) and len(link) >= 6:
            lk = UiLink(*link[:6])
        else:
            raise WorkflowError(f"malformed link {link!r}: expected [id, src, src_slot, dst, dst_slot, type]")
        out[lk.id] = lk
    return out


def ui_widget_values(node: Mapping, spec: NodeSpec) -> dict:
    """input name -> value from a UI node's positional widgets_values (frontend-only values skipped)."""
    values = node.get("widgets_values")
    if values is None:
        values = []
    if isinstance(values, Mapping):  # some frontends save widgets by name
        return {k: v for k, v in values.items() if k in spec.inputs and spec.inputs[k].is_widget}
    widgets = spec.widget_inputs
    expected = sum(1 + w.ui_extra_values for w in widgets)
    if len(values) != expected:
        layout = ", ".join(w.name + " +" + str(w.ui_extra_values) if w.ui_extra_values else w.name for w in widgets)
        raise WorkflowError(f"node {node.get('id')} ({spec.class_type}) has {len(values)} widgets_values but its "
                            f"widgets take {expected} ({layout or 'none'}); re-save the workflow in ComfyUI")
    out, i = {}, 0
    for w in widgets:
        out[w.name] = values[i]
        i += 1 + w.ui_extra_values
    return out


def _resolve_source(link_id, links: Mapping, nodes: Mapping, depth: int = 0):
    """The (node, slot) that really feeds a link, through reroutes and bypassed nodes; None when nothing does
    (a primitive node, whose value the target keeps in its own widget, or a muted node)."""
    if depth > 100 or link_id not in links:
        return None
    lk = links[link_id]
    src = nodes.get(lk.src)
    if src is None:
        return None
    kind, mode = src.get("type"), src.get("mode", 0)
    if kind == "Reroute":
        ins = src.get("inputs") or []
        return _resolve_source(ins[0].get("link"), links, nodes, depth + 1) if ins else None
    if kind in VIRTUAL_NODES or mode == MODE_MUTED:
        return None
    if mode == MODE_BYPASS:  # the frontend passes through an input of the same type, same index first
        ins = src.get("inputs") or []
        outs = src.get("outputs") or []
        out_type = outs[lk.src_slot].get("type") if lk.src_slot < len(outs) else lk.type
        order = ([lk.src_slot] if lk.src_slot < len(ins) else []) + list(range(len(ins)))
        for j in order:
            if ins[j].get("type") == out_type and ins[j].get("link") is not None:
                return _resolve_source(ins[j]["link"], links, nodes, depth + 1)
        return None
    return src["id"], lk.src_slot


def _wrap(value):
    return {"__value__": value} if isinstance(value, list) else value


def ui_to_api(ui_graph: Mapping, node_classes: Optional[Mapping] = None, *, display_names: Optional[Mapping] = None,
              specs: Optional[Mapping] = None) -> dict:
    """Convert a UI-format workflow into the API format ComfyUI's "Export (API)" writes.

    Widget values are named from each class's input order (required, then optional); inputs fed by a link take
    the link; frontend-only values are dropped; notes, primitives and reroutes vanish; muted and bypassed nodes
    are left out (a bypassed node's consumers are wired to its same-typed input).
    """
    if not is_ui_format(ui_graph):
        raise WorkflowError("not a UI-format workflow (expected 'nodes' and 'links')")
    specs = _specs(node_classes, specs, display_names)
    nodes = {n.get("id"): n for n in ui_graph["nodes"]}
    links = ui_links(ui_graph)
    api = {}
    for node_id in sorted(nodes, key=_id_key):
        node = nodes[node_id]
        kind = node.get("type")
        if kind in VIRTUAL_NODES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
            continue
        spec = specs.get(kind)
        if spec is None:
            raise WorkflowError(f"node {node_id}: unknown node type '{kind}'")
        values = ui_widget_values(node, spec)
        linked = {}
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            if slot.get("name") not in spec.inputs:
                raise WorkflowError(f"node {node_id} ({kind}): a link feeds '{slot.get('name')}', which is not an "
                                    f"input of {kind}")
            src = _resolve_source(slot["link"], links, nodes)
            if src is not None:
                linked[slot["name"]] = [str(src[0]), src[1]]
        inputs = {}
        for name in spec.inputs:
            if name in linked:
                inputs[name] = linked[name]
            elif name in values:
                inputs[name] = _wrap(values[name])
        api[str(node_id)] = {"inputs": inputs, "class_type": kind,
                             "_meta": {"title": node.get("title") or spec.display_name}}
    return api


def _id_key(node_id):
    try:
        return (0, int(str(node_id).split(":")[0]), str(node_id))
    except ValueError:
        return (1, 0, str(node_id))


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------

def types_match(output_type, input_type) -> bool:
    """ComfyUI's rule: equal, either side "*", or a shared member of comma-separated unions."""
    out_t, in_t = str(output_type), str(input_type)
    if out_t == in_t or "*" in (out_t, in_t):
        return True
    return bool({t.strip() for t in out_t.split(",")} & {t.strip() for t in in_t.split(",")})


def _label(node_id, node) -> str:
    return f"node {node_id} ({node.get('class_type') or node.get('type')})"


def _check_value(value, spec: InputSpec, extra: Iterable) -> Optional[str]:
    """None if `value` is legal for the widget input `spec`, else the reason."""
    if isinstance(value, Mapping) and "__value__" in value:
        value = value["__value__"]
    t, o = spec.type, spec.opts
    if t == "COMBO":
        if value in spec.choices or value in extra:
            return None
        if spec.file_kinds and isinstance(value, str) and value.strip():
            if value.startswith(("/", "\\")) or ".." in value.replace("\\", "/").split("/") or ":" in value[:3]:
                return f"'{value}' is not a relative file name inside ComfyUI's models/{spec.file_kinds[0]}"
            return None
        shown = ", ".join(repr(c) for c in spec.choices[:12]) + (", ..." if len(spec.choices) > 12 else "")
        return f"{value!r} is not one of the choices ({shown})"
    if t == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if t == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value!r} is not a number"
    if t == "INT" and not (isinstance(value, int) or (math.isfinite(value) and value == int(value))):
        return f"{value!r} is not a whole number"
    if not math.isfinite(value):
        return f"{value!r} is not a finite number"
    lo, hi, step = o.get("min"), o.get("max"), o.get("step")
    if lo is not None and value < lo:
        return f"{value!r} is below the minimum {lo}"
    if hi is not None and value > hi:
        return f"{value!r} is above the maximum {hi}"
    if t == "INT" and step and step > 1 and (int(value) - int(lo or 0)) % int(step):
        return f"{value!r} is not on the step {step} grid (from {lo or 0})"
    if t == "FLOAT":
        grid = o.get("round", step)
        if grid and grid is not False and grid > 0:
            k = value / grid
            if abs(k - round(k)) > 1e-6 * max(1.0, abs(k)):
                return f"{value!r} is not a multiple of {grid}"
    return None


def _extra_for(extra_choices: Optional[Mapping], class_type: str, name: str) -> set:
    if not extra_choices:
        return set()
    return set(extra_choices.get(f"{class_type}.{name}", ())) | set(extra_choices.get(name, ()))


def validate_api(api: Mapping, specs: Mapping, *, extra_choices: Optional[Mapping] = None) -> list:
    errors = []
    if not isinstance(api, Mapping) or not api:
        return ["the graph is empty or not a JSON object"]
    has_output = False
    for node_id, node in api.items():
        if not isinstance(node, Mapping) or not isinstance(node.get("class_type"), str):
            errors.append(f"node {node_id}: not a node (needs 'class_type' and 'inputs')")
            continue
        label = _label(node_id, node)
        spec = specs.get(node["class_type"])
        if spec is None:
            errors.append(f"{label}: unknown node type '{node['class_type']}' (neither a TuneLab node nor a "
                          f"core node in workflow.CORE_NODES)")
            continue
        has_output = has_output or spec.output_node
        inputs = node.get("inputs") or {}
        if not isinstance(inputs, Mapping):
            errors.append(f"{label}: 'inputs' is not an object")
            continue
        for name in inputs:
            if name not in spec.inputs:
                errors.append(f"{label}: unknown input '{name}' (inputs: {', '.join(spec.inputs) or 'none'})")
        for ispec in spec.inputs.values():
            if ispec.name not in inputs:
                if ispec.required:
                    errors.append(f"{label}: required input '{ispec.name}' ({ispec.type}) is missing")
                continue
            value = inputs[ispec.name]
            where = f"{label} input '{ispec.name}'"
            if is_link(value):
                src_id, slot = str(value[0]), value[1]
                src = api.get(src_id)
                if not isinstance(src, Mapping):
                    errors.append(f"{where}: linked to node {src_id}, which is not in the graph")
                    continue
                src_spec = specs.get(src.get("class_type"))
                if src_spec is None:
                    continue  # reported on that node
                if not 0 <= slot < len(src_spec.outputs):
                    errors.append(f"{where}: linked to output {slot} of {_label(src_id, src)}, which has "
                                  f"{len(src_spec.outputs)} outputs")
                    continue
                out_t = src_spec.outputs[slot]
                if not (types_match(out_t, ispec.type) or (ispec.type == "COMBO" and out_t == "COMBO")):
                    errors.append(f"{where}: expects {ispec.type} but is linked to output {slot} of "
                                  f"{_label(src_id, src)}, which gives {out_t}")
            elif not ispec.is_widget:
                errors.append(f"{where}: takes a {ispec.type} from another node's output, not the constant "
                              f"{value!r}")
            else:
                why = _check_value(value, ispec, _extra_for(extra_choices, node["class_type"], ispec.name))
                if why:
                    errors.append(f"{where}: {why}")
    if not has_output and not errors:
        errors.append("the graph has no output node (e.g. SaveImage or PreviewImage), so ComfyUI would run nothing")
    cycle = _find_cycle(api)
    if cycle:
        errors.append(f"the graph has a cycle through nodes {' -> '.join(cycle)}")
    return errors


def _find_cycle(api: Mapping) -> Optional[list]:
    deps = {str(k): [str(v[0]) for v in (n.get("inputs") or {}).values() if is_link(v)]
            for k, n in api.items() if isinstance(n, Mapping) and isinstance(n.get("inputs") or {}, Mapping)}
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in deps.get(n, ()):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d in deps and d not in state:
                found = visit(d)
                if found:
                    return found
        state[n] = 2
        stack.pop()
        return None

    for n in deps:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def validate_ui(ui: Mapping, specs: Mapping, *, extra_choices: Optional[Mapping] = None) -> list:
    errors = []
    nodes = {}
    for n in ui.get("nodes") or []:
        if not isinstance(n, Mapping) or "id" not in n:
            errors.append(f"malformed node entry {str(n)[:60]}")
            continue
        if n["id"] in nodes:
            errors.append(f"node id {n['id']} is used twice")
        nodes[n["id"]] = n
    try:
        links = ui_links(ui)
    except WorkflowError as e:
        return errors + [str(e)]
    for node_id, node in nodes.items():
        kind = node.get("type")
        if kind in VIRTUAL_NODES:
            continue
        spec = specs.get(kind)
        if spec is None:
            errors.append(f"node {node_id}: unknown node type '{kind}' (neither a TuneLab node nor a core node in "
                          f"workflow.CORE_NODES)")
            continue
        try:
            ui_widget_values(node, spec)
        except WorkflowError as e:
            errors.append(str(e))
        for slot in node.get("inputs") or []:
            if slot.get("name") not in spec.inputs:
                errors.append(f"node {node_id} ({kind}): input slot '{slot.get('name')}' is not an input of {kind}")
            link_id = slot.get("link")
            if link_id is not None and (link_id not in links or links[link_id].dst != node_id):
                errors.append(f"node {node_id} ({kind}) input '{slot.get('name')}': link {link_id} does not "
                              f"end here")
    for lk in links.values():
        src, dst = nodes.get(lk.src), nodes.get(lk.dst)
        if src is None or dst is None:
            errors.append(f"link {lk.id}: joins missing node {lk.src if src is None else lk.dst}")
            continue
        dst_inputs = dst.get("inputs") or []
        if not isinstance(lk.dst_slot, int) or not 0 <= lk.dst_slot < len(dst_inputs):
            errors.append(f"link {lk.id}: node {lk.dst} has no input slot {lk.dst_slot}")
        elif dst_inputs[lk.dst_slot].get("link") != lk.id:
            errors.append(f"link {lk.id}: input slot {lk.dst_slot} of node {lk.dst} does not point back to it")
        src_spec = specs.get(src.get("type"))
        if src_spec is not None and src.get("type") not in VIRTUAL_NODES:
            if not isinstance(lk.src_slot, int) or not 0 <= lk.src_slot < len(src_spec.outputs):
                errors.append(f"link {lk.id}: node {lk.src} ({src.get('type')}) has no output {lk.src_slot}")
            elif not types_match(src_spec.outputs[lk.src_slot], lk.type):
                errors.append(f"link {lk.id}: typed {lk.type} but output {lk.src_slot} of node {lk.src} "
                              f"({src.get('type')}) gives {src_spec.outputs[lk.src_slot]}")
    if errors:
        return errors
    try:
        api = ui_to_api(ui, specs=specs)
    except WorkflowError as e:
        return [str(e)]
    return validate_api(api, specs, extra_choices=extra_choices)


def validate(graph: Mapping, node_classes: Optional[Mapping] = None, *, extra_choices: Optional[Mapping] = None,
             specs: Optional[Mapping] = None, display_names: Optional[Mapping] = None) -> list:
    """Problems found in a UI- or API-format workflow, one readable line each; [] when it is fine.

    Checks: node types exist (`node_classes` or `CORE_NODES`), required inputs are present and unknown ones
    absent, widget values are legal (type, combo choice, min/max/step), links join existing outputs of matching
    type, and an output node exists. `extra_choices` accepts more combo values: {"Class.input" or "input": values}.
    """
    specs = _specs(node_classes, specs, display_names)
    if is_ui_format(graph):
        return list(dict.fromkeys(validate_ui(graph, specs, extra_choices=extra_choices)))
    return list(dict.fromkeys(validate_api(graph, specs, extra_choices=extra_choices)))


def same_graph(ui: Mapping, api: Mapping, node_classes: Optional[Mapping] = None, *,
               specs: Optional[Mapping] = None) -> list:
    """Differences between a UI-format file and its API twin ([] when they describe the same graph): the same
    nodes and types, the same links and the same values. Titles are not compared."""
    specs = _specs(node_classes, specs)
    try:
        mine = ui_to_api(ui, specs=specs)
    except WorkflowError as e:
        return [f"the UI file does not convert: {e}"]
    diffs = []
    for node_id in sorted(set(mine) | set(api), key=_id_key):
        a, b = mine.get(node_id), api.get(node_id)
        if a is None or b is None:
            diffs.append(f"node {node_id}: only in the {'API' if a is None else 'UI'} file")
            continue
        if a["class_type"] != b.get("class_type"):
            diffs.append(f"node {node_id}: {a['class_type']} in the UI file, {b.get('class_type')} in the API file")
            continue
        ia, ib = a["inputs"], b.get("inputs") or {}
        for name in sorted(set(ia) | set(ib)):
            va, vb = ia.get(name, "<absent>"), ib.get(name, "<absent>")
            if is_link(va) and is_link(vb):
                va, vb = [str(va[0]), va[1]], [str(vb[0]), vb[1]]
            if va != vb:
                diffs.append(f"node {node_id} ({a['class_type']}) input '{name}': {va!r} in the UI file, {vb!r} "
                             f"in the API file")
    return diffs


# --------------------------------------------------------------------------------------------------------------
# ComfyUI core nodes a TuneLab workflow may use (ComfyUI 0.8.0, as GET /object_info describes them)
# --------------------------------------------------------------------------------------------------------------

_SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
               "linear_quadratic", "kl_optimal"]
_UPSCALE = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
_MAX_SEED = 0xFFFFFFFFFFFFFFFF
_MAX_RES = 16384


def _int(default, lo, hi, step=None, **more):
    return ["INT", {"default": default, "min": lo, "max": hi, **({"step": step} if step else {}), **more}]


def _float(default, lo, hi, step, **more):
    return ["FLOAT", {"default": default, "min": lo, "max": hi, "step": step, **more}]


def _text(**opts):
    return ["STRING", dict(opts)]


_PROMPT = _text(multiline=True, dynamicPrompts=True)
_SEED = _int(0, 0, _MAX_SEED, control_after_generate=True)
_CFG = _float(8.0, 0.0, 100.0, 0.1, round=0.01)


def _node(display, required, output=(), *, optional=None, output_name=None, output_node=False):
    return {"input": {"required": dict(required), **({"optional": dict(optional)} if optional else {})},
            "output": list(output), "output_name": list(output_name or output), "output_node": output_node,
            "display_name": display}


CORE_NODES = {
    # loaders
    "CheckpointLoaderSimple": _node("Load Checkpoint", [("ckpt_name", [files("checkpoints")])],
                                    ["MODEL", "CLIP", "VAE"]),
    "VAELoader": _node("Load VAE", [("vae_name", [files("vae")])], ["VAE"]),
    "LoraLoader": _node("Load LoRA", [
        ("model", ["MODEL"]), ("clip", ["CLIP"]), ("lora_name", [files("loras")]),
        ("strength_model", _float(1.0, -100.0, 100.0, 0.01)), ("strength_clip", _float(1.0, -100.0, 100.0, 0.01))],
        ["MODEL", "CLIP"]),
    "LoraLoaderModelOnly": _node("LoraLoaderModelOnly", [
        ("model", ["MODEL"]), ("lora_name", [files("loras")]), ("strength_model", _float(1.0, -100.0, 100.0, 0.01))],
        ["MODEL"]),
    "LoadImage": _node("Load Image", [("image", [files("input"), {"image_upload": True}])], ["IMAGE", "MASK"]),
    # conditioning
    "CLIPTextEncode": _node("CLIP Text Encode (Prompt)", [("text", _PROMPT), ("clip", ["CLIP"])], ["CONDITIONING"]),
    "CLIPTextEncodeSDXL": _node(None, [
        ("clip", ["CLIP"]), ("width", _int(1024, 0, _MAX_RES)), ("height", _int(1024, 0, _MAX_RES)),
        ("crop_w", _int(0, 0, _MAX_RES)), ("crop_h", _int(0, 0, _MAX_RES)),
        ("target_width", _int(1024, 0, _MAX_RES)), ("target_height", _int(1024, 0, _MAX_RES)),
        ("text_g", _PROMPT), ("text_l", _PROMPT)], ["CONDITIONING"]),
    "CLIPTextEncodeSDXLRefiner": _node(None, [
        ("ascore", _float(6.0, 0.0, 1000.0, 0.01)), ("width", _int(1024, 0, _MAX_RES)),
        ("height", _int(1024, 0, _MAX_RES)), ("text", _PROMPT), ("clip", ["CLIP"])], ["CONDITIONING"]),
    "CLIPSetLastLayer": _node("CLIP Set Last Layer", [("clip", ["CLIP"]), ("stop_at_clip_layer", _int(-1, -24, -1, 1))],
                              ["CLIP"]),
    "ConditioningCombine": _node("Conditioning (Combine)", [("conditioning_1", ["CONDITIONING"]),
                                                            ("conditioning_2", ["CONDITIONING"])], ["CONDITIONING"]),
    "ConditioningConcat": _node("Conditioning (Concat)", [("conditioning_to", ["CONDITIONING"]),
                                                          ("conditioning_from", ["CONDITIONING"])], ["CONDITIONING"]),
    "ConditioningZeroOut": _node("ConditioningZeroOut", [("conditioning", ["CONDITIONING"])], ["CONDITIONING"]),
    "InstructPixToPixConditioning": _node(None, [
        ("positive", ["CONDITIONING"]), ("negative", ["CONDITIONING"]), ("vae", ["VAE"]), ("pixels", ["IMAGE"])],
        ["CONDITIONING", "CONDITIONING", "LATENT"], output_name=["positive", "negative", "latent"]),
    # sampling
    "KSampler": _node("KSampler", [
        ("model", ["MODEL"]), ("seed", _SEED), ("steps", _int(20, 1, 10000)), ("cfg", _CFG),
        ("sampler_name", [_SAMPLERS]), ("scheduler", [_SCHEDULERS]), ("positive", ["CONDITIONING"]),
        ("negative", ["CONDITIONING"]), ("latent_image", ["LATENT"]), ("denoise", _float(1.0, 0.0, 1.0, 0.01))],
        ["LATENT"]),
    "KSamplerAdvanced": _node("KSampler (Advanced)", [
        ("model", ["MODEL"]), ("add_noise", [["enable", "disable"]]), ("noise_seed", _SEED),
        ("steps", _int(20, 1, 10000)), ("cfg", _CFG), ("sampler_name", [_SAMPLERS]), ("scheduler", [_SCHEDULERS]),
        ("positive", ["CONDITIONING"]), ("negative", ["CONDITIONING"]), ("latent_image", ["LATENT"]),
        ("start_at_step", _int(0, 0, 10000)), ("end_at_step", _int(10000, 0, 10000)),
        ("return_with_leftover_noise", [["disable", "enable"]])], ["LATENT"]),
    "RandomNoise": _node(None, [("noise_seed", _SEED)], ["NOISE"]),
    "KSamplerSelect": _node(None, [("sampler_name", ["COMBO", {"multiselect": False, "options": _SAMPLERS}])],
                            ["SAMPLER"]),
    "BasicScheduler": _node(None, [
        ("model", ["MODEL"]), ("scheduler", ["COMBO", {"multiselect": False, "options": _SCHEDULERS}]),
        ("steps", _int(20, 1, 10000)), ("denoise", _float(1.0, 0.0, 1.0, 0.01))], ["SIGMAS"]),
    "CFGGuider": _node(None, [("model", ["MODEL"]), ("positive", ["CONDITIONING"]), ("negative", ["CONDITIONING"]),
                              ("cfg", _CFG)], ["GUIDER"]),
    "DualCFGGuider": _node(None, [
        ("model", ["MODEL"]), ("cond1", ["CONDITIONING"]), ("cond2", ["CONDITIONING"]),
        ("negative", ["CONDITIONING"]), ("cfg_conds", _CFG), ("cfg_cond2_negative", _CFG),
        ("style", ["COMBO", {"multiselect": False, "options": ["regular", "nested"]}])], ["GUIDER"]),
    "SamplerCustomAdvanced": _node(None, [
        ("noise", ["NOISE"]), ("guider", ["GUIDER"]), ("sampler", ["SAMPLER"]), ("sigmas", ["SIGMAS"]),
        ("latent_image", ["LATENT"])], ["LATENT", "LATENT"], output_name=["output", "denoised_output"]),
    # latents and images
    "EmptyLatentImage": _node("Empty Latent Image", [
        ("width", _int(512, 16, _MAX_RES, 8)), ("height", _int(512, 16, _MAX_RES, 8)),
        ("batch_size", _int(1, 1, 4096))], ["LATENT"]),
    "VAEDecode": _node("VAE Decode", [("samples", ["LATENT"]), ("vae", ["VAE"])], ["IMAGE"]),
    "VAEEncode": _node("VAE Encode", [("pixels", ["IMAGE"]), ("vae", ["VAE"])], ["LATENT"]),
    "EmptyImage": _node("EmptyImage", [
        ("width", _int(512, 1, _MAX_RES, 1)), ("height", _int(512, 1, _MAX_RES, 1)), ("batch_size", _int(1, 1, 4096)),
        ("color", _int(0, 0, 0xFFFFFF, 1, display="color"))], ["IMAGE"]),
    "ImageInvert": _node("Invert Image", [("image", ["IMAGE"])], ["IMAGE"]),
    "ImageScale": _node("Upscale Image", [
        ("image", ["IMAGE"]), ("upscale_method", [_UPSCALE]), ("width", _int(512, 0, _MAX_RES, 1)),
        ("height", _int(512, 0, _MAX_RES, 1)), ("crop", [["disabled", "center"]])], ["IMAGE"]),
    "ImageScaleBy": _node("Upscale Image By", [
        ("image", ["IMAGE"]), ("upscale_method", [_UPSCALE]), ("scale_by", _float(1.0, 0.01, 8.0, 0.01))], ["IMAGE"]),
    "ImageBatch": _node("Batch Images", [("image1", ["IMAGE"]), ("image2", ["IMAGE"])], ["IMAGE"]),
    "ImageStitch": _node("Image Stitch", [
        ("image1", ["IMAGE"]),
        ("direction", ["COMBO", {"default": "right", "multiselect": False, "options": ["right", "down", "left", "up"]}]),
        ("match_image_size", ["BOOLEAN", {"default": True}]), ("spacing_width", _int(0, 0, 1024, 2)),
        ("spacing_color", ["COMBO", {"default": "white", "multiselect": False,
                                     "options": ["white", "black", "red", "green", "blue"]}])],
        ["IMAGE"], optional=[("image2", ["IMAGE"])]),
    # outputs
    "SaveImage": _node("Save Image", [("images", ["IMAGE"]), ("filename_prefix", _text(default="ComfyUI"))],
                       output_node=True),
    "PreviewImage": _node("Preview Image", [("images", ["IMAGE"])], output_node=True),
}
