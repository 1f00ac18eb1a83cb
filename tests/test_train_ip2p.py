"""InstructPix2Pix fine-tuning: EMA, LoRA mode, the node and the command line (tiny-ip2p, 64 px, a few steps)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tunelab.core import instruct, instruct_data
from tunelab.core.errors import Interrupted, TuneLabError
from tunelab.core.images import pil_to_tensor
from tunelab.core.progress import Progress



def _picture(seed, size=64):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    img = np.stack([x, y, 0.5 + 0.5 * np.sin(7 * (x + y) + seed)], -1) * 0.7 + rng.uniform(0, 0.3, (size, size, 3))
    return Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8))


def _dataset(folder):
    clean = folder / "clean"
    clean.mkdir(parents=True)
    for i in range(3):
        _picture(30 + i).save(clean / f"c{i}.png")
    return instruct_data.synthesize(clean, folder / "tds", degradations=["rain", "low_light"], seed=0)["folder"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("ip2p_data"))


def _cfg(data, out, **kw):
    from tunelab.training.ip2p import Ip2pTrainConfig

    base = dict(data_dir=str(data), output=str(out), model="tiny-ip2p", device="cpu", dtype="fp32", resolution=64,
                max_train_steps=3, train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-3,
                checkpointing_steps=0, seed=3)
    base.update(kw)
    return Ip2pTrainConfig(**base)


def _unet(result):
    return load_file(str(result.output / "unet" / "diffusion_pytorch_model.safetensors"))


class StopAt2(Progress):
    def interrupted(self):
        return self.value >= 2


def test_defaults_and_command_line(capsys):
    from tunelab.cli import COMMANDS, main
    from tunelab.training import __main__ as trainers
    from tunelab.training.ip2p import Ip2pTrainConfig

    d = Ip2pTrainConfig("", "")
    assert d.conditioning_dropout_prob == 0.05 and d.use_ema is False and d.mode == "full"
    assert "train-ip2p" in COMMANDS and "ip2p" in trainers.TRAINERS
    for entry, argv in ((main, ["train-ip2p", "--help"]), (trainers.main, ["ip2p", "--help"])):
        with pytest.raises(SystemExit) as e:
            entry(argv)
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "--use-ema" in text and "--mode" in text and "--conditioning-dropout-prob" in text


def test_ema_changes_the_saved_weights_and_resumes_exactly(dataset, tmp_path):
    from tunelab.training.ip2p import train

    plain = train(_cfg(dataset, tmp_path / "plain", max_train_steps=4))
    ema = train(_cfg(dataset, tmp_path / "ema", max_train_steps=4, use_ema=True))
    assert plain.losses == ema.losses, "EMA does not change the training itself"
    a, b = _unet(plain), _unet(ema)
    assert any(not torch.equal(a[k], b[k]) for k in a), "the EMA weights are what is saved"
    assert json.loads((ema.output / "tunelab_training.json").read_text())["use_ema"] is True
    with pytest.raises(Interrupted):
        train(_cfg(dataset, tmp_path / "cut", max_train_steps=4, use_ema=True), progress=StopAt2)
    ck = load_file(str(next((tmp_path / "cut_run" / "checkpoints").glob("checkpoint-*")) / "state.safetensors"))
    assert any(k.startswith("state") for k in ck), "the checkpoint holds the EMA state"
    resumed = train(_cfg(dataset, tmp_path / "cut", max_train_steps=4, use_ema=True, resume="latest"))
    assert resumed.resumed_from is not None and resumed.losses == ema.losses
    c = _unet(resumed)
    assert all(torch.equal(b[k], c[k]) for k in b)
    with pytest.raises(TuneLabError) as e:  # a checkpoint without EMA does not resume an EMA run
        train(_cfg(dataset, tmp_path / "x", max_train_steps=4, resume="latest", run_dir=str(tmp_path / "cut_run")))
    assert e.value.input_name == "resume"


def test_lora_mode_saves_kohya_that_loads_and_changes_edits(tiny_ip2p, dataset, tmp_path):
    from tunelab.core import lora
    from tunelab.training.ip2p import train

    before = {k: v.clone() for k, v in tiny_ip2p.pipe.unet.state_dict().items()}
    res = train(_cfg(dataset, tmp_path / "l.safetensors", mode="lora", rank=4, lora_alpha=8, learning_rate=1e-2,
                     max_train_steps=2, use_ema=True, save_diffusers_copy=True))
    assert res.mode == "lora" and res.steps == 2 and res.output.is_file() and res.diffusers_path.is_file()
    assert res.run_dir == tmp_path / "l_run" and res.loss_curve_png.is_file()
    sd, meta = lora.read_file(res.output)
    assert sd and all(k.startswith("lora_unet_") for k in sd)
    for target in ("to_q", "to_k", "to_v", "to_out_0"):
        assert any(k.endswith(f"attn2_{target}.lora_down.weight") for k in sd), target
    assert meta["tunelab_format"] == "kohya" and meta["rank"] == "4" and meta["base_model"] == "tiny-ip2p"
    assert json.loads(meta["tunelab_settings"])["mode"] == "lora"
    assert any(k.startswith("unet.") for k in load_file(str(res.diffusers_path)))
    after = tiny_ip2p.pipe.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    img = pil_to_tensor([_picture(1, 32)])
    base = instruct.edit(tiny_ip2p, img, "derain the image", steps=1, seed=0)
    with_lora = lora.load(tiny_ip2p, res.output, 1.0)
    edited = instruct.edit(with_lora, img, "derain the image", steps=1, seed=0)
    assert not torch.equal(base, edited), "the LoRA changes the edit"
    # the diffusers copy (no alpha keys: alpha/rank = 2 folded into lora_B) edits as the kohya file does
    copy_edit = instruct.edit(lora.load(tiny_ip2p, res.diffusers_path, 1.0), img, "derain the image", steps=1, seed=0)
    torch.testing.assert_close(copy_edit, edited, atol=1e-5, rtol=0)
    assert torch.equal(base, instruct.edit(tiny_ip2p, img, "derain the image", steps=1, seed=0))
    # refusals, before anything is written
    for kw, name in ((dict(model="tiny-sd15"), "mode"), (dict(out=tmp_path / "no_suffix"), "output"),
                     (dict(out=res.output), "output"), (dict(target_modules=()), "target_modules"),
                     (dict(mode="half"), "mode")):
        with pytest.raises(TuneLabError) as e:
            train(_cfg(**{"data": dataset, "out": tmp_path / "r.safetensors", "mode": "lora", **kw}))
        assert e.value.input_name == name
    assert not (tmp_path / "r.safetensors").exists() and not (tmp_path / "no_suffix").exists()


def test_train_ip2p_node_confines_paths_and_returns_a_pipe(tiny_ip2p, tmp_path, monkeypatch):
    from tunelab import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, host
    from tunelab.core.models import PipeHandle
    from tunelab.nodes.train import TrainInstructPix2Pix

    assert NODE_CLASS_MAPPINGS["TuneLabTrainInstructPix2Pix"] is TrainInstructPix2Pix
    assert NODE_DISPLAY_NAME_MAPPINGS["TuneLabTrainInstructPix2Pix"] == "TuneLab Train InstructPix2Pix"
    spec = TrainInstructPix2Pix.INPUT_TYPES()
    for section in spec.values():
        for input_name, entry in section.items():
            assert entry[1].get("tooltip"), f"{input_name} has no tooltip"
    req = spec["required"]
    assert (req["resolution"][1]["default"], req["learning_rate"][1]["default"],
            req["conditioning_dropout_prob"][1]["default"], req["use_ema"][1]["default"]) == (256, 5e-5, 0.05, False)

    out, models_dir = tmp_path / "output", tmp_path / "models"
    monkeypatch.setenv("TUNELAB_OUTPUT", str(out))
    monkeypatch.setenv("TUNELAB_MODELS", str(models_dir))
    monkeypatch.setenv("TUNELAB_INPUT", str(tmp_path / "input"))
    _dataset(out / "ds")
    args = dict(pipe=tiny_ip2p, dataset_path="ds/tds", mode="lora", output_name="tl/ip2p_lora", resolution=64,
                max_train_steps=1, train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-2,
                conditioning_dropout_prob=0.05, use_ema=False, seed=0, resume="none")
    node = TrainInstructPix2Pix()
    res = node.train(**args, validation_image=pil_to_tensor([_picture(7)]), validation_prompt="derain the image")
    trained, name, curve, grid = res["result"]
    assert name == "tl/ip2p_lora.safetensors" and (host.model_dirs("loras")[0] / name).is_file()
    assert isinstance(trained, PipeHandle) and len(trained.loras) == 1 and curve.ndim == 4 and curve.shape[-1] == 3
    assert grid.shape[0] == 1 and grid.shape[2] == 64 and grid.shape[1] > 64  # the final edit, labelled
    assert "the seed's" in spec["required"]["train_batch_size"][1]["tooltip"]
    assert (out / "tunelab" / "train_ip2p" / "tl" / "ip2p_lora" / "loss_curve.png").is_file()
    assert res["ui"]["images"][0]["subfolder"] == "tunelab/train_ip2p/tl/ip2p_lora"
    full = node.train(**{**args, "mode": "full", "output_name": "tl/ip2p_full"})["result"]
    assert full[1] == "tl/ip2p_full" and (host.model_dirs("diffusers")[0] / "tl" / "ip2p_full" / "unet").is_dir()
    assert full[0].family == "ip2p" and full[0].pipe is not tiny_ip2p.pipe
    for bad, input_name in ((dict(output_name="../escape"), "output_name"),
                            (dict(output_name=str(tmp_path / "abs")), "output_name"),
                            (dict(output_name="  "), "output_name"),
                            (dict(dataset_path="../ds"), "dataset_path"),
                            (dict(dataset_path=str(tmp_path)), "dataset_path")):
        with pytest.raises(TuneLabError) as e:
            node.train(**{**args, **bad})
        assert e.value.input_name == input_name, bad
    assert not (tmp_path / "escape").exists() and not (tmp_path / "abs").exists()
