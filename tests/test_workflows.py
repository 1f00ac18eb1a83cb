"""Workflow check: shipped workflows validate, API twins are current, and the validator catches broken graphs.

Runs without ComfyUI: core node schemas come from workflow.CORE_NODES, TuneLab's from NODE_CLASS_MAPPINGS.
"""
import copy
import json

import pytest

from tunelab import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, cli
from tunelab.cli.workflows import WORKFLOWS_DIR, pack_specs
from tunelab.core import workflow as wf

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


def test_workflows_command_writes_and_checks_twins(tmp_path, capsys):
    folder = tmp_path / "workflows"
    folder.mkdir()
    (folder / "demo.json").write_text(json.dumps(build_ui()))
    assert cli.main(["workflows", "--dir", str(folder), "--check"]) == 1
    assert "is missing" in capsys.readouterr().err
    assert cli.main(["workflows", "--dir", str(folder)]) == 0
    twin = folder / "api" / "demo.json"
    assert json.loads(twin.read_text()) == EXPECTED_API
    assert cli.main(["workflows", "--dir", str(folder), "--check"]) == 0
    capsys.readouterr()

    ui = build_ui()
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
