"""Workflow check: shipped workflows validate, API twins are current, and the validator catches broken graphs.

Runs without ComfyUI: core node schemas come from workflow.CORE_NODES, TuneLab's from NODE_CLASS_MAPPINGS.
"""
import copy
import json

import pytest

from tunelab import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, cli
from tunelab.cli.workflows import WORKFLOWS_DIR, pack_specs
from tunelab.core import workflow as wf
from tunelab.core import workflow_layout as wl

UI_FILES = sorted(WORKFLOWS_DIR.glob("*.json"))
API_FILES = sorted((WORKFLOWS_DIR / "api").glob("*.json"))


def _params(paths):
    return ([pytest.param(p, id=p.name) for p in paths]
            or [pytest.param(None, marks=pytest.mark.skip(reason="no workflow files shipped yet"))])


@pytest.fixture(scope="module")
def specs():
    return pack_specs()


# ---------------------------------------------------------------------------------------------------------------
# A small UI-format graph: TuneLab's loader plus core nodes, a seed widget with its control value, a primitive
# feeding a widget input, a reroute and a note.
# ---------------------------------------------------------------------------------------------------------------

def _node(node_id, kind, widgets=None, inputs=(), outputs=(), **extra):
    return {"id": node_id, "type": kind, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": node_id, "mode": 0,
            "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs],
            "properties": {}, "widgets_values": list(widgets or []), **extra}


def _in(name, kind, link=None, widget=False):
    d = {"name": name, "type": kind, "link": link}
    if widget:
        d["widget"] = {"name": name}
    return d


def _out(name, kind, links=()):
    return {"name": name, "type": kind, "links": list(links)}


def build_ui():
    nodes = [
        _node(1, "TuneLabLoadPipeline", ["tiny-sdxl", "none", "auto", "auto"], outputs=[_out("pipe", "TUNELAB_PIPE")]),
        _node(2, "CheckpointLoaderSimple", ["sd_xl_base_1.0.safetensors"],
              outputs=[_out("MODEL", "MODEL", [1]), _out("CLIP", "CLIP", [2, 3]), _out("VAE", "VAE", [7])]),
        _node(3, "CLIPTextEncode", ["a photo of a cat"], [_in("clip", "CLIP", 2)],
              [_out("CONDITIONING", "CONDITIONING", [4])], title="Positive"),
        _node(4, "CLIPTextEncode", ["wrong"], [_in("clip", "CLIP", 3)], [_out("CONDITIONING", "CONDITIONING", [5])]),
        _node(5, "EmptyLatentImage", [1024, 1024, 1], outputs=[_out("LATENT", "LATENT", [6])]),
        _node(6, "KSampler", [42, "randomize", 20, 7.0, "euler", "normal", 1.0],
              [_in("model", "MODEL", 1), _in("positive", "CONDITIONING", 4), _in("negative", "CONDITIONING", 5),
               _in("latent_image", "LATENT", 6), _in("steps", "INT", 10, widget=True)],
              [_out("LATENT", "LATENT", [8])]),
        _node(7, "VAEDecode", None, [_in("samples", "LATENT", 8), _in("vae", "VAE", 7)], [_out("IMAGE", "IMAGE", [9])]),
        _node(8, "Reroute", None, [_in("", "*", 9)], [_out("", "IMAGE", [11])]),
        _node(9, "SaveImage", ["tunelab"], [_in("images", "IMAGE", 11)]),
        _node(10, "PrimitiveNode", [20, "fixed"], outputs=[{**_out("INT", "INT", [10]), "widget": {"name": "steps"}}]),
        _node(11, "Note", ["Notes are frontend-only."]),
    ]
    links = [[1, 2, 0, 6, 0, "MODEL"], [2, 2, 1, 3, 0, "CLIP"], [3, 2, 1, 4, 0, "CLIP"],
             [4, 3, 0, 6, 1, "CONDITIONING"], [5, 4, 0, 6, 2, "CONDITIONING"], [6, 5, 0, 6, 3, "LATENT"],
             [7, 2, 2, 7, 1, "VAE"], [8, 6, 0, 7, 0, "LATENT"], [9, 7, 0, 8, 0, "IMAGE"], [10, 10, 0, 6, 4, "INT"],
             [11, 8, 0, 9, 0, "IMAGE"]]
    return {"last_node_id": 11, "last_link_id": 11, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


EXPECTED_API = {
    "1": {"inputs": {"model": "tiny-sdxl", "vae": "none", "dtype": "auto", "device": "auto"},
          "class_type": "TuneLabLoadPipeline", "_meta": {"title": NODE_DISPLAY_NAME_MAPPINGS["TuneLabLoadPipeline"]}},
    "2": {"inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}, "class_type": "CheckpointLoaderSimple",
          "_meta": {"title": "Load Checkpoint"}},
    "3": {"inputs": {"text": "a photo of a cat", "clip": ["2", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "Positive"}},
    "4": {"inputs": {"text": "wrong", "clip": ["2", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "CLIP Text Encode (Prompt)"}},
    "5": {"inputs": {"width": 1024, "height": 1024, "batch_size": 1}, "class_type": "EmptyLatentImage",
          "_meta": {"title": "Empty Latent Image"}},
    "6": {"inputs": {"model": ["2", 0], "seed": 42, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
                     "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
                     "denoise": 1.0}, "class_type": "KSampler", "_meta": {"title": "KSampler"}},
    "7": {"inputs": {"samples": ["6", 0], "vae": ["2", 2]}, "class_type": "VAEDecode", "_meta": {"title": "VAE Decode"}},
    "9": {"inputs": {"images": ["7", 0], "filename_prefix": "tunelab"}, "class_type": "SaveImage",
          "_meta": {"title": "Save Image"}},
}


def _ui_node(ui, node_id):
    return next(n for n in ui["nodes"] if n["id"] == node_id)


def test_built_graph_converts_and_validates(specs):
    ui = build_ui()
    assert wf.validate(ui, specs=specs) == []
    api = wf.ui_to_api(ui, specs=specs)
    assert api == EXPECTED_API  # seed's "randomize" dropped, primitive/reroute/note gone, links through the reroute
    assert wf.validate(api, specs=specs) == []
    assert wf.same_graph(ui, api, specs=specs) == []
    # the one-call forms, from the node classes themselves
    assert wf.validate(ui, NODE_CLASS_MAPPINGS) == []
    assert wf.ui_to_api(ui, NODE_CLASS_MAPPINGS, display_names=NODE_DISPLAY_NAME_MAPPINGS) == EXPECTED_API


def test_control_after_generate_rules():
    seed = wf.InputSpec("seed", "INT", opts={"min": 0})
    assert seed.ui_extra_values == 1                               # by name
    assert wf.InputSpec("noise_seed", "INT").ui_extra_values == 1
    assert wf.InputSpec("seed", "INT", opts={"control_after_generate": False}).ui_extra_values == 0
    assert wf.InputSpec("steps", "INT").ui_extra_values == 0
    assert wf.InputSpec("number", "INT", opts={"control_after_generate": True}).ui_extra_values == 1
    assert wf.InputSpec("seed", "FLOAT").ui_extra_values == 0
    assert wf.InputSpec("choice", "COMBO", ("a", "b"), {"control_after_generate": True}).ui_extra_values == 2
    assert wf.InputSpec("image", "COMBO", ("a.png",), {"image_upload": True}).ui_extra_values == 1
    assert not wf.InputSpec("text", "STRING", opts={"forceInput": True}).is_widget


def test_load_image_upload_value_and_bypass(specs):
    ui = {"nodes": [
        _node(1, "LoadImage", ["cat.png", "image"], outputs=[_out("IMAGE", "IMAGE", [1]), _out("MASK", "MASK")]),
        _node(2, "ImageInvert", None, [_in("image", "IMAGE", 1)], [_out("IMAGE", "IMAGE", [2])], mode=4),
        _node(3, "PreviewImage", None, [_in("images", "IMAGE", 2)]),
        _node(4, "ImageInvert", None, [_in("image", "IMAGE", None)], [_out("IMAGE", "IMAGE")], mode=2)],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]], "version": 0.4}
    api = wf.ui_to_api(ui, specs=specs)
    assert api == {"1": {"inputs": {"image": "cat.png"}, "class_type": "LoadImage", "_meta": {"title": "Load Image"}},
                   "3": {"inputs": {"images": ["1", 0]}, "class_type": "PreviewImage",
                         "_meta": {"title": "Preview Image"}}}
    assert wf.validate(ui, specs=specs) == []


def test_every_tunelab_node_has_a_usable_schema(specs):
    """Generic over NODE_CLASS_MAPPINGS: each declared default is legal for its own input, and a UI node holding
    the defaults converts to an API node with those values."""
    assert NODE_CLASS_MAPPINGS, "the pack registers no nodes"
    for name in NODE_CLASS_MAPPINGS:
        spec = specs[name]
        assert name.startswith("TuneLab") and spec.outputs == tuple(
            wf._output_type(t) for t in NODE_CLASS_MAPPINGS[name].RETURN_TYPES)
        values, widgets = {}, []
        for ispec in spec.widget_inputs:
            if "default" in ispec.opts:
                value = ispec.opts["default"]
                why = wf._check_value(value, ispec, ())
                assert why is None, f"{name}.{ispec.name}: default {why}"
            else:
                value = {"INT": ispec.opts.get("min", 0), "FLOAT": ispec.opts.get("min", 0.0), "STRING": "",
                         "BOOLEAN": False}.get(ispec.type, (ispec.choices or ("x",))[0])
            values[ispec.name] = value
            widgets += [value] + ["fixed"] * ispec.ui_extra_values
        api = wf.ui_to_api({"nodes": [_node(1, name, widgets)], "links": []}, specs=specs)
        assert api["1"]["inputs"] == {k: wf._wrap(v) for k, v in values.items()}, name


def test_machine_dependent_combos(specs):
    api = copy.deepcopy(EXPECTED_API)
    ok = ["tiny-ip2p", "sd_xl_base_1.0.safetensors", "sub/dir/model.safetensors", "diffusers/my-model"]
    for value in ok:
        api["1"]["inputs"]["model"] = value
        assert wf.validate(api, specs=specs) == [], value
    for value in ["../outside.safetensors", "/etc/model.safetensors", "", 3]:
        api["1"]["inputs"]["model"] = value
        errors = wf.validate(api, specs=specs)
        assert any("input 'model'" in e for e in errors), (value, errors)
    api["1"]["inputs"]["model"] = "tiny-sdxl"
    api["1"]["inputs"]["dtype"] = "fp64"  # a fixed list: strict
    assert any("'fp64' is not one of the choices" in e for e in wf.validate(api, specs=specs))
    assert wf.validate(api, specs=specs, extra_choices={"TuneLabLoadPipeline.dtype": ["fp64"]}) == []


def _api_break(fn):
    def make():
        api = copy.deepcopy(EXPECTED_API)
        fn(api)
        return api
    return make


def _ui_break(fn):
    def make():
        ui = build_ui()
        fn(ui)
        return ui
    return make


def _ui_wrong_link(ui):
    ui["links"][3] = [4, 2, 0, 6, 1, "MODEL"]  # KSampler.positive fed from the checkpoint's MODEL


def _ui_missing_model(ui):
    ui["links"] = [lk for lk in ui["links"] if lk[0] != 1]
    _ui_node(ui, 6)["inputs"][0]["link"] = None


BROKEN = {
    # wrong link types
    "api-link-type": (_api_break(lambda a: a["6"]["inputs"].update(positive=["2", 0])), "expects CONDITIONING"),
    "api-tunelab-type": (_api_break(lambda a: a["7"]["inputs"].update(vae=["1", 0])), "gives TUNELAB_PIPE"),
    "api-bad-slot": (_api_break(lambda a: a["7"]["inputs"].update(vae=["2", 5])), "has 3 outputs"),
    "api-dangling-link": (_api_break(lambda a: a["7"]["inputs"].update(vae=["99", 0])), "not in the graph"),
    "ui-link-type": (_ui_break(_ui_wrong_link), "expects CONDITIONING"),
    "ui-link-record-type": (_ui_break(lambda u: u["links"][0].__setitem__(5, "LATENT")), "typed LATENT"),
    # missing node types
    "api-node-type": (_api_break(lambda a: a["6"].update(class_type="KSamplerX")), "unknown node type 'KSamplerX'"),
    "ui-node-type": (_ui_break(lambda u: _ui_node(u, 5).update(type="NoSuchNode")), "unknown node type 'NoSuchNode'"),
    # values out of range or illegal
    "api-below-min": (_api_break(lambda a: a["6"]["inputs"].update(steps=0)), "below the minimum 1"),
    "api-above-max": (_api_break(lambda a: a["6"]["inputs"].update(denoise=1.5)), "above the maximum 1.0"),
    "api-off-step": (_api_break(lambda a: a["5"]["inputs"].update(width=1001)), "step 8"),
    "api-float-grid": (_api_break(lambda a: a["6"]["inputs"].update(cfg=7.123)), "multiple of 0.01"),
    "api-not-int": (_api_break(lambda a: a["6"]["inputs"].update(steps=2.5)), "not a whole number"),
    "api-combo": (_api_break(lambda a: a["6"]["inputs"].update(sampler_name="nope")), "not one of the choices"),
    "api-type": (_api_break(lambda a: a["3"]["inputs"].update(text=5)), "not a string"),
    "api-constant-socket": (_api_break(lambda a: a["7"]["inputs"].update(vae="my.vae")), "takes a VAE"),
    "ui-out-of-range": (_ui_break(lambda u: _ui_node(u, 5)["widgets_values"].__setitem__(0, 8)), "below the minimum"),
    "ui-tunelab-combo": (_ui_break(lambda u: _ui_node(u, 1)["widgets_values"].__setitem__(2, "fp64")), "'fp64'"),
    # missing required inputs
    "api-missing-input": (_api_break(lambda a: a["6"]["inputs"].pop("model")), "required input 'model'"),
    "api-missing-widget": (_api_break(lambda a: a["1"]["inputs"].pop("dtype")), "required input 'dtype'"),
    "ui-missing-input": (_ui_break(_ui_missing_model), "required input 'model'"),
    # structure
    "api-unknown-input": (_api_break(lambda a: a["6"]["inputs"].update(sead=1)), "unknown input 'sead'"),
    "api-no-output": (_api_break(lambda a: a.pop("9")), "no output node"),
    "api-cycle": (_api_break(lambda a: a["3"]["inputs"].update(clip=["3", 0])), "cycle"),
    "ui-widget-count": (_ui_break(lambda u: _ui_node(u, 6)["widgets_values"].remove("randomize")), "widgets_values"),
    "ui-slot-mismatch": (_ui_break(lambda u: _ui_node(u, 7)["inputs"][0].update(link=7)), "does not point back"),
    "ui-foreign-link": (_ui_break(lambda u: _ui_node(u, 7)["inputs"][0].update(link=2)), "does not end here"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validator_fails_on_broken_copies(case, specs):
    make, expected = BROKEN[case]
    errors = wf.validate(make(), specs=specs)
    assert errors, f"{case}: the validator accepted a broken graph"
    assert any(expected in e for e in errors), (case, errors)


def test_same_graph_reports_differences(specs):
    ui = build_ui()
    api = copy.deepcopy(EXPECTED_API)
    api["6"]["inputs"]["seed"] = 43
    api["7"]["inputs"]["vae"] = ["1", 0]
    del api["4"]
    api["3"]["_meta"]["title"] = "renamed"  # titles do not count
    diffs = wf.same_graph(ui, api, specs=specs)
    assert len(diffs) == 3, diffs
    assert any("'seed'" in d and "43" in d for d in diffs)
    assert any("'vae'" in d for d in diffs)
    assert any("node 4: only in the UI file" in d for d in diffs)


GUIDANCE = ("Put sd_xl_base_1.0.safetensors in models/checkpoints/; pick tiny-sdxl for a first run; "
            "the image is saved in output/tunelab/.")


def readable(ui, specs):
    """`ui` laid out as the readability rules ask: nodes in a row at their estimated sizes, a guidance note,
    model hints on the checkpoint loader and a saved view that shows every title."""
    ui = copy.deepcopy(ui)
    ui["nodes"].append(_node(max(n["id"] for n in ui["nodes"]) + 1, "MarkdownNote", [GUIDANCE]))
    x = y = row_h = 0
    for i, n in enumerate(ui["nodes"]):
        w, h = wl.estimated_size(n, specs.get(n["type"]))
        if i and i % 4 == 0:  # four nodes a row
            x, y, row_h = 0, y + row_h + 40 + wl.TITLE_HEIGHT, 0
        n["pos"], n["size"] = [x, y], [round(w) + 1, round(h) + 1]
        x += n["size"][0] + 40
        row_h = max(row_h, n["size"][1])
        for v in n["widgets_values"]:
            if v == "sd_xl_base_1.0.safetensors":
                n["properties"]["models"] = [{"name": v, "directory": "checkpoints", "url": "https://example.org/m"}]
    ui["extra"] = {"ds": wl.fit_view(ui, specs)}
    return ui


def _thumbnail(path, seed=0):
    """A small JPEG with some detail (a gradient), as a stand-in for a rendered graph."""
    from PIL import Image

    im = Image.linear_gradient("L").resize((256, 256)).convert("RGB")
    im.save(path, "JPEG", quality=80)
    return path


def test_workflows_command_writes_and_checks_twins(tmp_path, capsys, specs):
    folder = tmp_path / "workflows"
    folder.mkdir()
    (folder / "demo.json").write_text(json.dumps(readable(build_ui(), specs)))
    _thumbnail(folder / "demo.jpg")
    assert cli.main(["workflows", "--dir", str(folder), "--check"]) == 1
    assert "is missing" in capsys.readouterr().err
    assert cli.main(["workflows", "--dir", str(folder)]) == 0
    twin = folder / "api" / "demo.json"
    assert json.loads(twin.read_text()) == EXPECTED_API
    assert cli.main(["workflows", "--dir", str(folder), "--check"]) == 0
    capsys.readouterr()

    ui = readable(build_ui(), specs)
    _ui_node(ui, 3)["widgets_values"] = ["a photo of a dog"]
    (folder / "demo.json").write_text(json.dumps(ui))
    assert cli.main(["workflows", "--dir", str(folder), "--check"]) == 1
    assert "stale" in capsys.readouterr().err
    (folder / "api" / "orphan.json").write_text(json.dumps(EXPECTED_API))
    assert cli.main(["workflows", "--dir", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "orphan.json: no UI-format workflow" in err
    assert json.loads(twin.read_text())["3"]["inputs"]["text"] == "a photo of a dog"

    _ui_node(ui, 5)["widgets_values"] = [1001, 1024, 1]
    (folder / "demo.json").write_text(json.dumps(ui))
    (folder / "api" / "orphan.json").unlink()
    assert cli.main(["workflows", "--dir", str(folder)]) == 1
    assert "step 8" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The files the pack ships
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", _params(UI_FILES))
def test_shipped_ui_workflow_is_valid(path, specs):
    ui = json.loads(path.read_text(encoding="utf-8"))
    assert wf.is_ui_format(ui), f"{path.name}: workflows/ holds UI-format files; API files go in workflows/api/"
    assert wf.validate(ui, specs=specs) == []


@pytest.mark.parametrize("path", _params(API_FILES))
def test_shipped_api_workflow_is_valid(path, specs):
    api = json.loads(path.read_text(encoding="utf-8"))
    assert wf.is_api_format(api), f"{path.name} is not API format"
    assert wf.validate(api, specs=specs) == []


@pytest.mark.parametrize("path", _params(UI_FILES))
def test_shipped_api_twin_is_current(path, specs):
    twin = WORKFLOWS_DIR / "api" / path.name
    assert twin.is_file(), f"api/{path.name} is missing: run python -m tunelab workflows"
    ui = json.loads(path.read_text(encoding="utf-8"))
    api = json.loads(twin.read_text(encoding="utf-8"))
    assert wf.same_graph(ui, api, specs=specs) == []
    assert wf.ui_to_api(ui, specs=specs) == api, f"api/{path.name} is stale: run python -m tunelab workflows"


def test_every_api_file_has_a_ui_twin():
    orphans = [p.name for p in API_FILES if not (WORKFLOWS_DIR / p.name).is_file()]
    assert not orphans, f"API files without a UI-format workflow: {orphans}"


@pytest.mark.parametrize("path", _params(UI_FILES))
def test_shipped_workflow_is_readable(path, specs):
    """No overlaps against the frontend's sizes, a first view showing every title, a guidance note, model hints
    for the missing-models dialog, and a thumbnail for the template browser."""
    ui = json.loads(path.read_text(encoding="utf-8"))
    assert wl.layout_problems(ui, specs) == []
    assert wl.thumbnail_problems(path.with_suffix(".jpg")) == []
    assert ui["extra"]["ds"] == wl.fit_view(ui, specs), "saved view is stale: python -m tunelab workflows --fit-view"


# (class, title, width, height) that comfyui-frontend 1.35.9 and 1.58.1 computed for shipped nodes
# (LGraphNode.computeSize, measured with tools/workflow_shots.py; both versions gave the same numbers; Train LoRA
# and Instruct Evaluate re-measured after they grew new widgets, Train LoRA while expanded). The first two are the
# issue's long titles that widened their nodes over their neighbours.
MEASURED = [
    ("TuneLabInstructionDataset", "Held-out pairs: derain / denoise / deblur / low-light from the input folder",
     514.3, 440),
    ("TuneLabCompare", "3. Compare: base / + negative 'wrong' / new LoRA + negative 'wrong'", 500.6, 388),
    ("ImageStitch", "Before / after", 210, 150), ("LoadImage", "Image to edit", 222.8, 102),
    ("MarkdownNote", "Read me", 210, 88), ("PreviewImage", "Grid", 140, 26),
    ("PreviewImage", "input / base / fine-tuned / ground truth", 295.2, 26), ("SaveImage", "Save", 210, 58),
    ("TuneLabApplyWrongLora", "Apply Wrong LoRA", 210, 234),
    ("TuneLabCompare", "Three-way comparison (base + refiner)", 300.9, 388), ("TuneLabGenerate", "Generate", 210, 266),
    ("TuneLabGenerate", "Generate (base -> refiner at 0.8)", 252.8, 266),
    ("TuneLabInstructEdit", "Instruct Edit (igs 1.5, gs 7.0, 20 steps)", 285.3, 282),
    ("TuneLabInstructEvaluate", "Instruct Evaluate (PSNR / SSIM / CLIP / DINOv2)", 357.3, 556),
    ("TuneLabInstructionDataset", "Held-out pairs: derain / denoise / deblur / low-light", 375.2, 440),
    ("TuneLabLoadLora", "Load the wrong LoRA", 210, 82),
    ("TuneLabLoadPipeline", "Fine-tuned: instruction-tuned low-level model", 342.9, 130),
    ("TuneLabLoadPipeline", "Load SDXL base", 210, 130), ("TuneLabTrainLora", "2. Train the LoRA", 268.6, 1440),
    ("TuneLabWeightedPrompt", "Weighted prompt (compel syntax)", 264.3, 190),
    ("TuneLabWrongImageSynthesis", "TuneLab Wrong Image Synthesis", 257.3, 480),
]


@pytest.mark.parametrize("kind,title,width,height", MEASURED, ids=[f"{m[0]}:{m[1][:20]}" for m in MEASURED])
def test_size_estimate_is_at_least_what_the_frontend_computes(kind, title, width, height, specs):
    est_w, est_h = wl.estimated_size({"type": kind, "title": title}, specs.get(kind))
    assert est_w >= width and est_h >= height, (est_w, est_h)
    assert est_w <= 1.35 * width  # conservative, not absurd


def _shipped_copy(tmp_path, name="three_way_comparison"):
    folder = tmp_path / "workflows"
    (folder / "api").mkdir(parents=True)
    for rel in (f"{name}.json", f"{name}.jpg", f"api/{name}.json"):
        (folder / rel).write_bytes((WORKFLOWS_DIR / rel).read_bytes())
    return folder, folder / f"{name}.json"


def _check(folder, capsys):
    rc = cli.main(["workflows", "--dir", str(folder), "--check"])
    return rc, capsys.readouterr().err


def test_check_passes_on_a_shipped_copy(tmp_path, capsys):
    folder, _ = _shipped_copy(tmp_path)
    assert _check(folder, capsys) == (0, "")


def test_check_fails_on_two_overlapping_nodes(tmp_path, capsys):
    folder, path = _shipped_copy(tmp_path)
    ui = json.loads(path.read_text())
    a, b = ui["nodes"][0], ui["nodes"][1]
    b["pos"] = [a["pos"][0] + 50, a["pos"][1] + 40]
    path.write_text(json.dumps(ui))
    rc, err = _check(folder, capsys)
    assert rc == 1
    assert f"node {a['id']} '{a['title']}' and node {b['id']} '{b['title']}' overlap by" in err


def test_check_fails_when_a_title_widens_a_node_over_its_neighbour(tmp_path, capsys):
    """The issue's case: a saved width that fits the widgets but not the title, 20 px from the next node."""
    folder, path = _shipped_copy(tmp_path)
    ui = json.loads(path.read_text())
    loader = next(n for n in ui["nodes"] if n["type"] == "TuneLabLoadPipeline")
    loader["title"] = "Held-out pairs: derain / denoise / deblur / low-light from the input folder"
    path.write_text(json.dumps(ui))
    rc, err = _check(folder, capsys)
    assert rc == 1
    assert "is less than the" in err and "its title and widgets may need" in err
    assert "overlap by" in err


def test_check_fails_without_a_thumbnail(tmp_path, capsys):
    folder, path = _shipped_copy(tmp_path)
    path.with_suffix(".jpg").unlink()
    rc, err = _check(folder, capsys)
    assert rc == 1 and "no thumbnail three_way_comparison.jpg" in err


def test_check_fails_without_a_note(tmp_path, capsys):
    folder, path = _shipped_copy(tmp_path)
    ui = json.loads(path.read_text())
    ui["nodes"] = [n for n in ui["nodes"] if n["type"] not in wl.NOTE_TYPES]
    path.write_text(json.dumps(ui))
    rc, err = _check(folder, capsys)
    assert rc == 1 and "no guidance note" in err


def test_note_must_say_models_tiny_and_output():
    ui = {"nodes": [_node(1, "Note", ["Put the checkpoint in models/checkpoints/."])], "links": []}
    problems = wl.note_problems(ui)
    assert len(problems) == 2
    assert any("tiny-*" in p for p in problems) and any("output/" in p for p in problems)
    ui["nodes"][0]["widgets_values"] = [GUIDANCE]
    assert wl.note_problems(ui) == []


def test_first_view_rules(specs):
    ui = readable(build_ui(), specs)
    assert wl.first_view_problems(ui, specs) == []
    ui["extra"]["ds"] = {"scale": 1, "offset": [0, 0]}  # what every shipped file had: titles under the chrome
    problems = wl.first_view_problems(ui, specs)
    assert problems and all("not inside the area the chrome leaves free" in p for p in problems)
    ui["extra"]["ds"] = {"scale": 0.5, "offset": [200, 300]}
    assert any("below 0.6" in p for p in wl.first_view_problems(ui, specs))
    del ui["extra"]["ds"]
    assert "no saved view" in wl.first_view_problems(ui, specs)[0]


# Node rectangles (x, y, w, h, title bar included) of instruct_edit.json as comfyui-frontend 1.58.1 sized them, and
# the view it opened that workflow with from the template browser (measured with tools/workflow_shots.py).
FITTED_1_58 = {"rects": [(0, 370, 360, 160), (420, -30, 400, 360), (420, 370, 400, 360), (880, -30, 400, 390),
                         (880, 400, 400, 180), (880, 620, 400, 290), (0, -30, 360, 360)],
               "scale": 0.625, "offset": [384, 200]}


def _boxes_ui(rects, kind="PreviewImage"):
    nodes = [_node(i + 1, kind, pos=[x, y + wl.TITLE_HEIGHT], size=[w, h - wl.TITLE_HEIGHT])
             for i, (x, y, w, h) in enumerate(rects)]
    return {"nodes": nodes, "links": [], "groups": []}


def test_template_view_is_the_frontends_fit(specs):
    """1.58 ignores extra.ds when opening from the template browser and fits every node into 75% of the window."""
    view = wl.template_view(_boxes_ui(FITTED_1_58["rects"]), specs)
    assert view["scale"] == pytest.approx(FITTED_1_58["scale"], abs=1e-3)
    assert view["offset"] == pytest.approx(FITTED_1_58["offset"], abs=0.5)


def test_template_view_rules(specs):
    ui = readable(build_ui(), specs)
    assert wl.template_view_problems(ui, specs) == []
    # a graph too wide for 1280 px at zoom 0.6: the newer frontend opens it with blank boxes
    wide = copy.deepcopy(ui)
    _ui_node(wide, 9)["pos"][0] = 2400
    assert "fits every node at zoom" in wl.template_view_problems(wide, specs)[0]
    # a group title above every node sits under the run bar once the graph is fitted
    top = min(wl.node_box(n, specs.get(n["type"])).y for n in ui["nodes"])
    grouped = copy.deepcopy(ui)
    grouped["groups"] = [{"title": "above", "bounding": [0, top - 80, 300, 60]}]
    problems = wl.template_view_problems(grouped, specs)
    assert any("group 'above'" in p and "level with the top node's title" in p for p in problems)


def test_a_collapsed_node_counts_as_its_title_and_opens_into_free_space(specs):
    """A node too tall for the fitted view (TuneLab Train LoRA) is saved collapsed; the space it opens into must
    be free, and its saved size must still hold its widgets."""
    train = _node(1, "TuneLabTrainLora", pos=[0, 0], flags={"collapsed": True})
    train["size"] = [round(v) + 1 for v in wl.estimated_size(train, specs["TuneLabTrainLora"])]
    other = _node(2, "PreviewImage", pos=[0, 300], size=[200, 100])
    ui = {"nodes": [train, other], "links": [], "groups": []}
    box = wl.node_box(train, specs["TuneLabTrainLora"])
    assert box.h == wl.TITLE_HEIGHT and box.w < 250
    assert wl.node_box(train, specs["TuneLabTrainLora"], expanded=True).h > 1000
    problems = wl.overlap_problems(ui, specs)
    assert len(problems) == 1 and "is collapsed; expanded it would cover" in problems[0]
    other["pos"] = [train["size"][0] + 40, 0]
    assert wl.overlap_problems(ui, specs) == []
    assert wl.template_view(ui, specs)["scale"] > 1  # the fitted view counts the pill, not the 1450 px node
    train["size"][1] = 900
    assert "saved height 900" in wl.size_problems(ui, specs)[0]
    train["size"][1] += 1000
    train["title"] = "2. Train the wrong LoRA"  # drawn collapsed as "2. Train the wrong L"
    assert "cuts a collapsed node's title to 20 characters" in wl.size_problems(ui, specs)[0]


def test_train_nodes_fold_only_rarely_changed_inputs(specs):
    """Train LoRA / Train InstructPix2Pix flag their rarely changed optional inputs advanced (1.58's Vue nodes fold
    them); every input keeps its tooltip, and what a shipped workflow sets is never folded away."""
    from tunelab.nodes import train

    for cls, shown in ((train.TrainLora, train.TRAIN_LORA_SHOWN), (train.TrainInstructPix2Pix, train.TRAIN_IP2P_SHOWN)):
        types = cls.INPUT_TYPES()
        assert not any(e[1].get("advanced") for e in types["required"].values())
        folded = {name for name, e in types["optional"].items() if e[1].get("advanced")}
        assert folded == set(types["optional"]) - set(shown) and len(folded) >= 20
        assert all(e[1].get("tooltip") for section in types.values() for e in section.values())
    ui = json.loads((WORKFLOWS_DIR / "train_wrong_lora.json").read_text())
    assert wl.advanced_value_problems(ui, specs) == []
    trainer = next(n for n in ui["nodes"] if n["type"] == "TuneLabTrainLora")
    spec = specs["TuneLabTrainLora"]
    i = sum(1 + w.ui_extra_values for w in spec.widget_inputs[:[w.name for w in spec.widget_inputs].index("use_dora")])
    trainer["widgets_values"][i] = True
    problems = wl.advanced_value_problems(ui, specs)
    assert len(problems) == 1 and "use_dora = True differs from its default False" in problems[0]


def test_model_hints_for_the_missing_models_dialog(specs):
    ui = readable(build_ui(), specs)
    assert wl.model_hint_problems(ui, specs) == []
    loader = _ui_node(ui, 2)
    loader["properties"]["models"][0]["directory"] = "loras"
    assert "directory 'loras'" in wl.model_hint_problems(ui, specs)[0]
    loader["properties"]["models"][0].update(directory="checkpoints", url="http://example.org/m")
    assert "https url" in wl.model_hint_problems(ui, specs)[0]
    del loader["properties"]["models"]
    assert "has no entry in properties.models" in wl.model_hint_problems(ui, specs)[0]
    _ui_node(ui, 1)["widgets_values"][0] = "tiny-sdxl"  # built-in presets need no download
    assert all("node 1 " not in p for p in wl.model_hint_problems(ui, specs))


def test_groups_must_not_overlap_or_cut_nodes(specs):
    ui = readable(build_ui(), specs)
    first = ui["nodes"][0]
    fx, fy = first["pos"]
    ui["groups"] = [{"title": "load", "bounding": [fx - 10, fy - 80, first["size"][0] + 20, first["size"][1] + 90]}]
    assert wl.group_problems(ui, specs) == []
    ui["groups"][0]["bounding"][2] -= 60  # the group's border now cuts the node
    assert "across the border" in wl.group_problems(ui, specs)[0]
    ui["groups"][0]["bounding"][2] += 60
    ui["groups"].append({"title": "other", "bounding": [fx, fy, 50, 50]})
    assert any("groups 'load' and 'other' overlap" in p for p in wl.group_problems(ui, specs))


def test_thumbnail_rules(tmp_path):
    from PIL import Image

    assert "no thumbnail" in wl.thumbnail_problems(tmp_path / "none.jpg")[0]
    Image.new("RGB", (256, 256), (40, 40, 40)).save(tmp_path / "flat.jpg", "JPEG")
    assert "flat colour" in wl.thumbnail_problems(tmp_path / "flat.jpg")[0]
    Image.linear_gradient("L").convert("RGB").save(tmp_path / "png.jpg", "PNG")
    assert "not JPEG" in wl.thumbnail_problems(tmp_path / "png.jpg")[0]
    Image.linear_gradient("L").resize((64, 64)).convert("RGB").save(tmp_path / "tiny.jpg", "JPEG")
    assert "64x64" in wl.thumbnail_problems(tmp_path / "tiny.jpg")[0]
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    assert "not a readable image" in wl.thumbnail_problems(tmp_path / "junk.jpg")[0]
    assert wl.thumbnail_problems(_thumbnail(tmp_path / "ok.jpg")) == []


def test_orphan_thumbnail_is_reported(tmp_path, capsys):
    folder, _ = _shipped_copy(tmp_path)
    _thumbnail(folder / "gone.jpg")
    rc, err = _check(folder, capsys)
    assert rc == 1 and "gone.jpg: a thumbnail without a workflow gone.json" in err


def test_fit_view_command_rewrites_only_stale_views(tmp_path, capsys):
    folder, path = _shipped_copy(tmp_path)
    ui = json.loads(path.read_text())
    ui["extra"]["ds"] = {"scale": 1, "offset": [0, 0]}
    path.write_text(json.dumps(ui))
    assert _check(folder, capsys)[0] == 1
    assert cli.main(["workflows", "--dir", str(folder), "--fit-view"]) == 0
    assert json.loads(path.read_text())["extra"]["ds"] == json.loads(
        (WORKFLOWS_DIR / path.name).read_text())["extra"]["ds"]
    capsys.readouterr()
    assert cli.main(["workflows", "--dir", str(folder), "--fit-view"]) == 0
    assert "0 written" in capsys.readouterr().out
