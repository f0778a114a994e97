"""The trained demo model: DemoModelLoader restores the file exactly, and a stock
txt2img graph on it draws the prompted object.

Runs against the weights DemoModelLoader uses (demo/weights/demo_model.safetensors,
or $ATTENTION_LAB_DEMO_WEIGHTS); without them the loader's error says how to train them.
"""

import time

import pytest
import torch
from safetensors import safe_open

from attention_lab.demo import detect

STEPS, CFG = 20, 5.0  # as demo/train.py measures single-object fidelity
# (prompt, expected colour, expected shape); batch of 2 per prompt: two noise seeds each
PROMPTS = [("a red circle", "red", "circle"), ("a blue square", "blue", "square")]


@pytest.fixture(scope="module")
def demo(host):
    return host.module("nodes.demo")


def txt2img_prompt(text: str, seed: int, batch: int) -> dict:
    """DemoModelLoader → CLIPTextEncode → KSampler → VAEDecode → SaveImage, in API format."""
    return {
        "1": {"class_type": "DemoModelLoader", "inputs": {}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": batch}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": STEPS, "cfg": CFG, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "demo_model_test"}},
    }


def test_loader_restores_the_vocabulary_rows_and_zeroes_the_rest(demo):
    path = demo.weights_path()
    _, clip, _ = demo.load_demo_model(path)
    with safe_open(str(path), framework="pt") as handle:
        rows = handle.get_tensor("clip." + demo.TOKEN_EMBEDDING).float()
        ids = handle.get_tensor("clip." + demo.TOKEN_IDS).long()
    table = clip.cond_stage_model.state_dict()[demo.TOKEN_EMBEDDING].float()
    assert table.shape == (49408, rows.shape[1])
    assert torch.equal(table[ids], rows)
    others = torch.ones(table.shape[0], dtype=torch.bool)
    others[ids] = False
    assert not table[others].any()
    # The vocabulary's rows were trained: none of them is zero.
    assert rows.abs().sum(1).min() > 0


def test_loader_caches_the_models_and_hands_out_clones(demo):
    model_a, clip_a, vae_a = demo.load_demo_model()
    model_b, clip_b, vae_b = demo.load_demo_model()
    assert model_a is not model_b and model_a.is_clone(model_b)
    assert clip_a is not clip_b and clip_a.cond_stage_model is clip_b.cond_stage_model
    assert vae_a is vae_b


def test_missing_weights_name_the_file_and_the_command(demo, tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors.*python demo/train\.py"):
        demo.load_demo_model(missing)
    with pytest.raises(ValueError, match="ATTENTION_LAB_DEMO_WEIGHTS.*safetensors"):
        demo.load_demo_model(tmp_path / "model.ckpt")


# Issue 3's txt2img criterion: a stock graph on the committed weights draws the prompted object, for
# each prompt and both noise seeds (fixed seeds on the CPU: deterministic). Over all 35 colour-shape
# pairs the weights' single-object fidelity is in demo_model.json (issue 3's target: 90%).
def test_txt2img_draws_the_prompted_object(host):
    missed = []
    for text, color, shape in PROMPTS:
        start = time.perf_counter()
        outputs = host.run(txt2img_prompt(text, seed=1, batch=2))
        seconds = time.perf_counter() - start
        assert len(outputs["7"]["images"]) == 2
        images = host.node_output("6")[0][0]
        assert images.shape == (2, 128, 128, 3)
        assert seconds < 30, f"the graph took {seconds:.1f} s"
        for image in images.numpy():
            found = [(o.color, o.shape) for o in detect.detect_objects(image)]
            if (color, shape) not in found:
                missed.append(f"{text!r}: detected {found}")
    assert not missed, "; ".join(missed)
