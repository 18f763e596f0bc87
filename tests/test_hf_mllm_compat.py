"""MLLM exports across transformers releases: the embedded tiny LLaVA and ``train-mllm``'s exports load on 4.37,
4.57 and 5.x (scripts/hf_venvs.sh runs this file in the 4.x venvs) to the same weights, with their processor and
tokenizer; the embedded model names the shape of freshly drawn scenes and ``alphaclip ask`` answers with it; an
export written on this release gives the same logits on every release whose venv is present."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import import_or_skip  # noqa: E402

import_or_skip("transformers")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import alphaclip_plugins.integrations.hf as ahf  # noqa: E402
from alphaclip_plugins.integrations.hf.ask import load_llava  # noqa: E402
from alphaclip_plugins.integrations.hf.compat import BLIP2_PORTABLE_KEYS, portable_key  # noqa: E402
from alphaclip_plugins.integrations.hf.tiny_llava import TINY_LLAVA_DIR  # noqa: E402
from alphaclip_plugins.train.mllm_synthetic import QUESTIONS  # noqa: E402
from alphaclip_plugins.train.scenes import draw_scene  # noqa: E402
from alphaclip_plugins.train.synthetic import SceneConfig  # noqa: E402
from test_mllm_embedded import scores  # noqa: E402
from test_mllm_train import _train, blip2_dir, llava_dir  # noqa: E402,F401  (tiny checkpoints and their data)

ROOT = Path(__file__).resolve().parents[1]
VENVS = Path(os.environ.get("ALPHACLIP_VENVS", Path.home() / ".cache" / "alphaclip-plugins" / "venvs"))
#: The one layout every release reads (4.37's names).
PORTABLE = ("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.", "language_model.lm_head.")
FRESH_SEED = 20261203  # neither the training (0) nor the held-out (1) seed, nor test_mllm_embedded's
PROMPT = "USER: <image>\nwhat is this ? ASSISTANT:"
BOX = (6, 4, 40, 30)
# Run in a release's python: load an export with transformers' classes, print what loaded and save its logits
# for PROMPT on the image with BOX (each release builds the inputs with its own processor and tokenizer).
READER = """
import json, sys, torch, transformers
from PIL import Image
from safetensors.torch import save_file
import alphaclip_plugins.integrations.hf as ahf
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration
ahf.register()
folder, image, out, prompt, box = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
model, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
processor = AutoProcessor.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
batch = processor(images=[Image.open(image).convert("RGB")], text=[prompt], regions=[tuple(box)], return_tensors="pt")
with torch.no_grad():
    logits = model.float().eval()(**batch).logits
save_file({"logits": logits[0].contiguous()}, out)
print(json.dumps({"version": transformers.__version__, "not_loaded": {k: list(v) for k, v in info.items() if v},
                  "processor": type(processor).__name__, "tokenizer": type(tokenizer).__name__,
                  "ids": tokenizer("what is this ?")["input_ids"]}))
"""

# The same for an Alpha BLIP-2 export: what loaded, under the file's names.
BLIP2_READER = """
import json, sys, transformers
from safetensors.torch import save_file
import alphaclip_plugins.integrations.hf as ahf
from alphaclip_plugins.integrations.hf.compat import BLIP2_PORTABLE_KEYS, portable_key
from transformers import AutoImageProcessor, AutoTokenizer
ahf.register()
model, info = ahf.AlphaBlip2ForConditionalGeneration.from_pretrained(sys.argv[1], output_loading_info=True)
save_file({portable_key(k, BLIP2_PORTABLE_KEYS): v.float().clone() for k, v in model.state_dict().items()}, sys.argv[2])
print(json.dumps({"version": transformers.__version__, "not_loaded": {k: list(v) for k, v in info.items() if v},
                  "processor": type(AutoImageProcessor.from_pretrained(sys.argv[1])).__name__,
                  "ids": AutoTokenizer.from_pretrained(sys.argv[1])("what is this ?")["input_ids"]}))
"""


def _file_tensors(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def _fresh_scenes(n):
    for i in range(n):
        yield draw_scene(np.random.default_rng([FRESH_SEED, i]), SceneConfig())


def _other_pythons():
    """The pythons of the transformers-release venvs (scripts/hf_venvs.sh) other than this release's."""
    found = []
    for py in sorted(VENVS.glob("tf-*/bin/python")):
        if py.parent.parent.name != f"tf-{transformers.__version__}":
            found.append(py)
    return found


def _read_on(python: Path, code: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(python), "-c", code, *args], env=env, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_asset_is_written_in_the_layout_every_release_reads():
    keys = list(_file_tensors(TINY_LLAVA_DIR))
    assert keys and all(k.startswith(PORTABLE) for k in keys), [k for k in keys if not k.startswith(PORTABLE)][:4]
    assert all(portable_key(k) == k for k in keys)
    tok = json.loads((TINY_LLAVA_DIR / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and "USER:" in tok["chat_template"]
    image = json.loads((TINY_LLAVA_DIR / "preprocessor_config.json").read_text())
    assert image["image_processor_type"] == "AlphaCLIPImageProcessor" and image["image_size"] == 64


def test_asset_loads_every_weight_and_names_the_shape_of_fresh_scenes():
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(TINY_LLAVA_DIR, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    saved = _file_tensors(TINY_LLAVA_DIR)
    loaded = {portable_key(k): v for k, v in model.state_dict().items()}  # this release's names -> the file's
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())  # bit-identical, whatever the release
    assert isinstance(AutoProcessor.from_pretrained(TINY_LLAVA_DIR), ahf.AlphaLlavaProcessor)
    assert "USER:" in AutoTokenizer.from_pretrained(TINY_LLAVA_DIR).chat_template

    right, whole_right, total = scores(*load_llava(), _fresh_scenes(8))
    assert total >= 16
    assert right / total >= 0.8, (right, total)
    assert whole_right / total <= 0.4, (whole_right, total)  # the region, not the image, decides the answer


def test_ask_cli_with_the_default_model(tmp_path):
    scene = next(_fresh_scenes(1))
    scene.image.save(tmp_path / "scene.png")
    Image.fromarray((scene.masks[1] > 0).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "alphaclip_plugins.cli", "ask", str(tmp_path / "scene.png"),
                           "--mask", str(tmp_path / "mask.png"), QUESTIONS[0]],
                          env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"a {scene.shapes[1].label}"


def test_train_mllm_export_loads_on_every_release_with_equal_logits(llava_dir, tmp_path):  # noqa: F811
    final = _train(llava_dir, "compat", steps=2)
    keys = list(_file_tensors(final))
    assert keys and all(k.startswith(PORTABLE) for k in keys)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(tmp_path / "image.png")  # non-square
    readers = [Path(sys.executable)] + _other_pythons()
    results = []
    for k, python in enumerate(readers):
        report = _read_on(python, READER, str(final), str(tmp_path / "image.png"),
                          str(tmp_path / f"logits{k}.safetensors"), PROMPT, json.dumps(BOX))
        assert not report["not_loaded"], report
        assert report["processor"] == "AlphaLlavaProcessor", report
        results.append((report, load_file(str(tmp_path / f"logits{k}.safetensors"))["logits"]))
    (here, reference), others = results[0], results[1:]
    assert here["version"] == transformers.__version__ and reference.shape[0] > 16  # the image's tokens are in it
    for report, logits in others:
        assert report["ids"] == here["ids"], report["version"]
        assert logits.shape == reference.shape, report["version"]
        assert (logits - reference).abs().max() < 1e-5, report["version"]
    print("export of", transformers.__version__, "read on", [r["version"] for r, _ in results])


def test_blip2_export_loads_the_same_weights_on_every_release(blip2_dir, tmp_path):  # noqa: F811
    final = _train(blip2_dir, "compat", steps=2)
    saved = _file_tensors(final)
    assert all(portable_key(k, BLIP2_PORTABLE_KEYS) == k for k in saved)
    assert any(k.startswith("vision_model.vision_model.") for k in saved)  # the tower under 4.x's names
    reports = []
    for k, python in enumerate([Path(sys.executable)] + _other_pythons()):
        report = _read_on(python, BLIP2_READER, str(final), str(tmp_path / f"weights{k}.safetensors"))
        assert not report["not_loaded"] and report["processor"] == "AlphaCLIPImageProcessor", report
        loaded = load_file(str(tmp_path / f"weights{k}.safetensors"))
        assert saved.keys() <= loaded.keys(), report["version"]
        assert all(torch.equal(loaded[n], v.float()) for n, v in saved.items()), report["version"]
        reports.append(report)
    assert all(r["ids"] == reports[0]["ids"] for r in reports)
    print("BLIP-2 export of", transformers.__version__, "read on", [r["version"] for r in reports])
