"""The embedded tiny region-aware LLaVA: it loads with transformers' own classes, names the highlighted shape of
freshly drawn scenes, is not region-wise with whole-image alpha, and a batch of regions generates as each alone;
``alphaclip ask`` and ``alphaclip eval-mllm`` with it, and their errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import import_or_skip  # noqa: E402
from test_cli_errors import _fails  # noqa: E402  (one line on stderr, the exit status)

import_or_skip("transformers")

import torch  # noqa: E402

import alphaclip_plugins.integrations.hf as ahf  # noqa: E402
from alphaclip_plugins.core.factory import DEFAULT_MODEL_DIR  # noqa: E402
from alphaclip_plugins.cli import main  # noqa: E402
from alphaclip_plugins.integrations.hf.ask import ask, load_llava  # noqa: E402
from alphaclip_plugins.integrations.hf.llava import _llava_core  # noqa: E402
from alphaclip_plugins.integrations.hf.tiny_llava import TINY_LLAVA_DIR, VOCAB  # noqa: E402
from alphaclip_plugins.train.mllm_data import ConversationDataset  # noqa: E402
from alphaclip_plugins.train.mllm_synthetic import QUESTIONS, ConversationConfig, ensure_conversations  # noqa: E402
from alphaclip_plugins.train.scenes import draw_scene  # noqa: E402
from alphaclip_plugins.train.synthetic import SceneConfig  # noqa: E402

FRESH_SEED = 20261202  # neither the training (0) nor the held-out (1) seed


@pytest.fixture(scope="module")
def llava():
    return load_llava()


def test_asset_loads_with_transformers_classes_and_is_small():
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    size = sum(f.stat().st_size for f in TINY_LLAVA_DIR.iterdir())
    assert size <= 10 * 2**20, size
    model = LlavaForConditionalGeneration.from_pretrained(TINY_LLAVA_DIR)
    assert isinstance(_llava_core(model).vision_tower, ahf.AlphaCLIPVisionModel)
    tower = _llava_core(model).vision_tower
    fresh = ahf.AlphaCLIPVisionModel(tower.config)
    ahf.load_alpha_weights(fresh, DEFAULT_MODEL_DIR)  # the embedded Alpha-CLIP through the one loading path
    trained = tower.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in fresh.state_dict().items())  # the tower stayed frozen
    processor = AutoProcessor.from_pretrained(TINY_LLAVA_DIR)
    assert isinstance(processor, ahf.AlphaLlavaProcessor)
    tok = AutoTokenizer.from_pretrained(TINY_LLAVA_DIR)
    assert tok.chat_template and tok.is_fast
    words = {w.lower() for q in QUESTIONS for w in q.replace("?", " ?").replace(".", " .").split()}
    assert words <= set(VOCAB) and tok.unk_token_id not in tok(" ".join(sorted(words)))["input_ids"]


def _fresh_scenes(n):
    cfg = SceneConfig()
    for i in range(n):
        yield draw_scene(np.random.default_rng([FRESH_SEED, i]), cfg)


def scores(model, processor, scenes):
    """(regions named exactly, the same with whole-image alpha, regions) over ``scenes``."""
    right = whole_right = total = 0
    for scene in scenes:
        regions = [m.astype(bool) for m in scene.masks]
        answers = ask(model, processor, scene.image, regions, QUESTIONS[0])
        whole = ask(model, processor, scene.image, [None], QUESTIONS[0])[0]
        truth = [f"a {s.label}" for s in scene.shapes]
        right += sum(a == t for a, t in zip(answers, truth))
        whole_right += sum(whole == t for t in truth)
        total += len(truth)
    return right, whole_right, total


def test_names_the_highlighted_shape_of_fresh_scenes_and_not_with_the_whole_image(llava):
    right, whole_right, total = scores(*llava, _fresh_scenes(12))
    assert total >= 30
    assert right / total >= 0.8, (right, total)
    assert whole_right / total <= 0.4, (whole_right, total)  # one answer for every region: at most one is right


def test_a_batch_of_regions_generates_what_each_region_generates_alone(llava):
    model, processor = llava
    scene = next(_fresh_scenes(1))
    box = scene.shapes[0].box
    regions = [scene.masks[0].astype(bool), box, None] + [m.astype(bool) for m in scene.masks[1:]]
    questions = [QUESTIONS[k % len(QUESTIONS)] for k in range(len(regions))]  # prompts of different lengths
    batch = ask(model, processor, scene.image, regions, questions)
    alone = [ask(model, processor, scene.image, [r], q)[0] for r, q in zip(regions, questions)]
    assert batch == alone
    assert len(set(batch)) > 1  # the regions differ, so do their answers


def _example(tmp_path):
    scene = next(_fresh_scenes(1))
    image, mask = tmp_path / "scene.png", tmp_path / "mask.png"
    scene.image.save(image)
    Image.fromarray(scene.masks[0] * 255).save(mask)
    return scene, image, mask


def test_ask_cli_answers_each_region(tmp_path, capsys):
    scene, image, mask = _example(tmp_path)
    x0, y0, x1, y1 = scene.shapes[1].box
    main(["ask", str(image), "--mask", str(mask), "--box", f"{x0},{y0},{x1},{y1}", "--json", QUESTIONS[0]])
    out = json.loads(capsys.readouterr().out)
    assert [r["region"] for r in out] == [f"mask {mask}", f"box {x0},{y0},{x1},{y1}"]
    model, processor = load_llava()
    assert [r["answer"] for r in out] == ask(model, processor, scene.image, [scene.masks[0] > 0, (x0, y0, x1, y1)],
                                             QUESTIONS[0])


def test_ask_cli_errors_are_one_line(tmp_path, capsys):
    scene, image, mask = _example(tmp_path)
    q = QUESTIONS[0]
    assert "does not exist" in _fails(["ask", str(tmp_path / "missing.png"), "--mask", str(mask), q], capsys)
    assert "x0,y0,x1,y1" in _fails(["ask", str(image), "--box", "1,2,3", q], capsys, 2)
    w, h = scene.image.size
    assert "outside" in _fails(["ask", str(image), "--box", f"{w + 5},{h + 5},{w + 20},{h + 20}", q], capsys)
    Image.fromarray(np.ones((h + 3, w), np.uint8) * 255).save(tmp_path / "big.png")
    assert "shape" in _fails(["ask", str(image), "--mask", str(tmp_path / "big.png"), q], capsys)
    Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / "empty.png")
    assert "empty" in _fails(["ask", str(image), "--mask", str(tmp_path / "empty.png"), q], capsys)
    assert "question is empty" in _fails(["ask", str(image), "--mask", str(mask), "  "], capsys, 2)
    assert "no LLaVA model" in _fails(["ask", str(image), "--model", str(tmp_path / "nowhere"), q], capsys)
    _fails(["ask", str(image)], capsys, 2)  # no question
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"  # a directory whose weights do not all fit (another release's layout)
    shutil.copytree(TINY_LLAVA_DIR, partial)
    sd = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "patch_embedding_alpha" not in k}, partial / "model.safetensors",
              metadata={"format": "pt"})
    assert "weights are missing" in _fails(["ask", str(image), "--mask", str(mask), "--model", str(partial), q], capsys)


def test_eval_mllm_scores_regions_and_whole_image(tmp_path, capsys):
    data = tmp_path / "eval" / "samples.jsonl"
    ensure_conversations(data, ConversationConfig(num_images=6, seed=FRESH_SEED))
    n = len(ConversationDataset.from_file(data))
    main(["eval-mllm", "--data", str(data), "--json", "--no-java", "--examples"])
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == n and not report["skipped"]
    region, whole = report["region"], report["whole_image"]
    exact = np.mean([e["region"] == e["reference"] for e in report["examples"]])
    assert region["exact"] == pytest.approx(exact) and region["exact"] >= 0.7
    assert whole["exact"] < region["exact"] and whole["CIDEr"] < region["CIDEr"]
    assert region["METEOR"] is None and any("METEOR" in m for m in report["messages"])
    main(["eval-mllm", "--data", str(data), "--no-java", "--limit", "3"])
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["score", "region", "whole", "gain"] and "3 samples" in table
    assert "is not a file" in _fails(["eval-mllm", "--data", str(tmp_path / "none.jsonl")], capsys, 2)


def test_the_repo_config_builds_the_model_and_data_on_first_use_and_trains(tmp_path):
    from alphaclip_plugins.train.mllm_cli import main as train_mllm

    config = Path(__file__).resolve().parents[1] / "configs" / "mllm" / "tiny_shapes_llava.yaml"
    run = tmp_path / "run"
    rc = train_mllm([str(config), f"output_dir={run}", f"model.path={run}/init", f"data.train={run}/data/s.jsonl",
                     "data.synthetic.num_images=3", "data.num_workers=0", "steps=2", "batch_size=4",
                     f"export.dir={run}/final", "progress=false", "tensorboard=false"])
    assert not rc
    assert (run / "init" / "config.json").is_file() and (run / "data" / "s.jsonl").is_file()
    _same_layout_as_the_asset(run / "final")
    model, processor = load_llava(run / "final")
    scene = next(_fresh_scenes(1))
    assert len(ask(model, processor, scene.image, [scene.masks[0] > 0], QUESTIONS[0])) == 1


def _same_layout_as_the_asset(export: Path) -> None:
    """The recipe's export has the shipped asset's files, tensor names, shapes and dtypes, and processor files."""
    from safetensors import safe_open

    from alphaclip_plugins.train.mllm_export import MARKER

    names = sorted(p.name for p in export.iterdir() if p.name != MARKER)
    assert names == sorted(p.name for p in TINY_LLAVA_DIR.iterdir())

    def tensors(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}

    assert tensors(export) == tensors(TINY_LLAVA_DIR)
    for name in ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json", "tokenizer.json"):
        assert json.loads((export / name).read_text()) == json.loads((TINY_LLAVA_DIR / name).read_text()), name
