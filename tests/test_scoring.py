"""CLIP score / PickScore / embeddings against independent transformers computations, and the statistics."""
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tunelab.core import scoring, statistics, tiny
from tunelab.core.errors import TuneLabError


def _image(seed, size=48):
    return Image.fromarray((np.random.RandomState(seed).rand(size, size + 8, 3) * 255).astype(np.uint8))


def _independent_logits(folder, image, text):
    """transformers' own CLIPModel forward: logits_per_image = logit_scale.exp() * cos(image, text)."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(folder), use_safetensors=True).eval()
    tok = CLIPTokenizer.from_pretrained(str(folder))
    processor = scoring._image_processor(folder, "test")
    with torch.no_grad():
        out = model(**tok([text], return_tensors="pt", padding=True),
                    pixel_values=processor(images=[image], return_tensors="pt")["pixel_values"])
    return float(out.logits_per_image[0, 0]), float(model.logit_scale.exp())


@pytest.mark.parametrize("preset,kind", [("tiny-clip", "clip"), ("tiny-pickscore", "pickscore")])
def test_scores_equal_clipmodel_forward(preset, kind):
    scorer = scoring.load(preset, kind, device="cpu")
    folder = tiny.ensure_scorer(preset)
    for seed, text in ((0, "a red fox"), (1, "a photo of a (cat)++ in the snow"), (2, "wrong")):
        image = _image(seed)
        logits, scale = _independent_logits(folder, image, scoring.scoring_text(text))
        cos = float((scorer.image_embedding(image) * scorer.text_embedding(text)).sum())
        assert cos == pytest.approx(logits / scale, abs=1e-6)
        # the scores themselves: float32 logits carry ~1e-7 relative rounding, so compare relatively
        expected = 100.0 * max(logits / scale, 0.0) if kind == "clip" else logits
        assert scorer.score(image, text) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    if kind == "pickscore":
        assert scale == pytest.approx(100.0, rel=1e-6)
    # compel syntax is stripped before CLIP reads the prompt
    assert scorer.score(_image(1), "a photo of a (cat)++ in the snow") == scorer.score(_image(1),
                                                                                     "a photo of a cat in the snow")


def test_tiny_clip_scores_are_not_degenerate():
    scorer = scoring.load("tiny-clip", "clip", device="cpu")
    scores = [scorer.score(_image(s), "a fox") for s in range(6)]
    assert all(s > 0 for s in scores) and len(set(scores)) == 6


def test_dino_and_clip_image_embeddings_equal_transformers():
    from transformers import CLIPModel, Dinov2Model

    a, b = _image(3), _image(4)
    dino = scoring.load("tiny-dinov2", "dino", device="cpu")
    model = Dinov2Model.from_pretrained(str(tiny.ensure_scorer("tiny-dinov2"))).eval()
    pv = scoring._image_processor(tiny.ensure_scorer("tiny-dinov2"), "t")
    with torch.no_grad():
        ea, eb = (model(pixel_values=pv(images=[x], return_tensors="pt")["pixel_values"]).pooler_output[0]
                  for x in (a, b))
    ref = float(torch.nn.functional.cosine_similarity(ea, eb, dim=0))
    assert scoring.cosine(dino.image_embedding(a), dino.image_embedding(b)) == pytest.approx(ref, abs=1e-6)
    clip = scoring.load("tiny-clip", "clip", device="cpu")
    cm = CLIPModel.from_pretrained(str(tiny.ensure_scorer("tiny-clip"))).eval()
    cp = scoring._image_processor(tiny.ensure_scorer("tiny-clip"), "t")
    with torch.no_grad():
        feats = [cm.visual_projection(cm.vision_model(pixel_values=cp(images=[x], return_tensors="pt")
                                                      ["pixel_values"]).pooler_output)[0] for x in (a, b)]
    ref = float(torch.nn.functional.cosine_similarity(*feats, dim=0))
    assert scoring.cosine(clip.image_embedding(a), clip.image_embedding(b)) == pytest.approx(ref, abs=1e-6)


def test_scorer_folders_are_checked(tmp_path):
    src = tiny.ensure_scorer("tiny-clip")
    folder = tmp_path / "clip"
    shutil.copytree(src, folder)
    assert scoring.load(str(folder), "clip", device="cpu").identity["model"] == "clip"
    with pytest.raises(TuneLabError, match="DINOv2") as e:
        scoring.load(str(folder), "dino")
    assert e.value.input_name == "dino_model"
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(TuneLabError, match="preprocessor_config.json"):
        scoring.load(str(folder), "pickscore")
    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(TuneLabError, match="pickle"):
        scoring.load(str(pickled), "clip")
    with pytest.raises(TuneLabError, match="not a folder"):
        scoring.load(str(tmp_path / "nope"), "clip")


# ---------------------------------------------------------------------------------------------------------------
# statistics


def test_all_wins_all_ties_and_a_60_40_split():
    n = 10
    idx = statistics.resample_indices(n, 2000, seed=0)
    wins = statistics.win_rate([2.0] * n, [1.0] * n, idx)
    assert (wins["wins"], wins["ties"], wins["losses"]) == (10, 0, 0)
    assert wins["win_rate"] == 1.0 and (wins["low"], wins["high"]) == (1.0, 1.0)
    assert wins["sign_test_p"] == pytest.approx(2 / 2 ** 10)
    losses = statistics.win_rate([1.0] * n, [2.0] * n, idx)
    assert losses["win_rate"] == 0.0 and (losses["low"], losses["high"]) == (0.0, 0.0)
    ties = statistics.win_rate([1.5] * n, [1.5] * n, idx)
    assert (ties["ties"], ties["win_rate"], ties["low"], ties["high"], ties["sign_test_p"]) == (10, 0.5, 0.5, 0.5, 1.0)

    # 60 wins, 40 losses: the bootstrap win count of 100 resampled units is Binomial(100, 0.6), so the interval
    # must match that distribution's 2.5% / 97.5% quantiles
    n = 100
    a = [1.0] * 60 + [0.0] * 40
    b = [0.5] * n
    res = statistics.win_rate(a, b, statistics.resample_indices(n, 20000, seed=3))
    assert res["win_rate"] == pytest.approx(0.6) and (res["wins"], res["losses"]) == (60, 40)
    cdf, k, lo, hi = 0.0, 0, None, None
    for k in range(n + 1):
        cdf += math.comb(n, k) * 0.6 ** k * 0.4 ** (n - k)
        if lo is None and cdf >= 0.025:
            lo = k / n
        if hi is None and cdf >= 0.975:
            hi = k / n
    assert res["low"] == pytest.approx(lo, abs=0.011) and res["high"] == pytest.approx(hi, abs=0.011)
    exact = 2 * sum(math.comb(100, i) for i in range(41)) / 2 ** 100
    assert res["sign_test_p"] == pytest.approx(exact, rel=1e-12)
    # ties count one half
    half = statistics.win_rate([1, 1, 2, 0], [1, 1, 1, 1], statistics.resample_indices(4, 500))
    assert half["win_rate"] == pytest.approx((2 * 0.5 + 1) / 4) and half["sign_test_p"] == 1.0


def test_means_and_pairing():
    rng = np.random.RandomState(0)
    x = rng.normal(10.0, 2.0, size=400)
    idx = statistics.resample_indices(400, 4000, seed=1)
    m = statistics.mean_interval(x, idx)
    se = x.std(ddof=1) / math.sqrt(400)
    assert m["mean"] == pytest.approx(x.mean())
    assert m["low"] == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert m["high"] == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)
    const = statistics.mean_interval([3.0] * 7, statistics.resample_indices(7, 200))
    assert (const["mean"], const["low"], const["high"]) == (3.0, 3.0, 3.0)
    s = statistics.summarize({"a": [1, 2, 3], "b": [2, 3, 4], "c": [0, 0, 9]}, resamples=300, seed=5)
    assert [(p["a"], p["b"]) for p in s["pairs"]] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert s["pairs"][0]["win_rate"] == 0.0 and s["pairs"][1]["wins"] == 2
    assert s == statistics.summarize({"a": [1, 2, 3], "b": [2, 3, 4], "c": [0, 0, 9]}, resamples=300, seed=5)
    with pytest.raises(TuneLabError):
        statistics.summarize({"a": [1, 2], "b": [1]})
    with pytest.raises(TuneLabError) as e:
        statistics.check_resamples(5)
    assert e.value.input_name == "resamples"
