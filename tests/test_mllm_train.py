"""``alphaclip train-mllm`` on tiny LLaVA and BLIP-2 models built here: recipes, loss normalisation, resume after
SIGKILL, 2 processes, accumulation, export round trips, config errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import import_or_skip  # noqa: E402
import_or_skip("transformers")

import alphaclip_plugins.integrations.hf as ahf  # noqa: E402
from alphaclip_plugins.core.io import read_state_dict  # noqa: E402
from alphaclip_plugins.integrations.hf.compat import BLIP2_PORTABLE_KEYS, portable_key  # noqa: E402
from alphaclip_plugins.integrations.hf.mllm_collator import IGNORE_INDEX  # noqa: E402
from alphaclip_plugins.train.checkpointing import Checkpointer  # noqa: E402
from alphaclip_plugins.train.config import _set_dotted, load_config  # noqa: E402
from alphaclip_plugins.train.mllm_config import MLLMTrainConfig  # noqa: E402
from alphaclip_plugins.train.mllm_model import load_trainable  # noqa: E402
from alphaclip_plugins.train.mllm_trainer import build, train_mllm  # noqa: E402
from alphaclip_plugins.train.rundir import RunDirError  # noqa: E402
from conftest import HF_TINY_VISION  # noqa: E402
from test_hf_mllm_data import EOS, IMAGE_TOKEN, _tokenizer  # noqa: E402
from transformers import (  # noqa: E402
    Blip2QFormerConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
# Answers of different lengths: a per-micro-batch mean would weigh their tokens differently.
ANSWERS = ["a red circle on the left", "blue", "a small square", "the big blue circle on the right and a square"]


def _text_config():
    return LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, pad_token_id=1, bos_token_id=2,
                       eos_token_id=EOS)


def _write_data(folder: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        region = [2, 2, 24, 30] if i % 2 == 0 else [28, 10, 50, 38]  # textured, non-square, two regions
        lines.append({"id": str(i), "image": f"{i}.png", "region": region,
                      "conversations": [{"from": "human", "value": "<image>\nwhat is this ?"},
                                        {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]}]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llava")
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**HF_TINY_VISION), text_config=_text_config(),
                         image_token_index=IMAGE_TOKEN, image_seq_length=16, pad_token_id=1)
    model = ahf.alphafy_llava(LlavaForConditionalGeneration(config))
    emb = ahf.vision_body(model.model.vision_tower if hasattr(model, "model") else model.vision_tower).embeddings
    torch.nn.init.normal_(emb.patch_embedding_alpha.weight, std=0.2)  # so that the region matters
    model.save_pretrained(folder / "model")
    _tokenizer().save_pretrained(folder / "model")
    _write_data(folder)
    return folder


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("blip2")
    torch.manual_seed(0)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = ahf.AlphaBlip2Config(vision_config=HF_TINY_VISION, qformer_config=qformer.to_dict(),
                                  text_config=_text_config().to_dict(), num_query_tokens=4, image_token_index=IMAGE_TOKEN)
    ahf.AlphaBlip2ForConditionalGeneration(config).save_pretrained(folder / "model")
    _tokenizer().save_pretrained(folder / "model")
    _write_data(folder)
    return folder


def _config(folder: Path, run: str, **over) -> dict:
    cfg = {"model": {"path": str(folder / "model")}, "data": {"train": str(folder / "train.jsonl"), "num_workers": 0},
           "optim": {"lr": 3e-2, "warmup_steps": 1}, "output_dir": str(folder / run), "steps": 4, "batch_size": 4,
           "threads": 1, "log_every": 1, "save_every": 0, "tensorboard": False, "progress": False}
    for key, value in over.items():
        _set_dotted(cfg, key, value)
    return cfg


def _train(folder: Path, run: str, **over) -> Path:
    return train_mllm(load_config(None, [f"{k}={json.dumps(v)}" for k, v in _flat(_config(folder, run, **over))],
                                  MLLMTrainConfig), overwrite=True)


def _flat(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _losses(run: Path):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _subprocess(folder: Path, run: str, *, nproc: int = 1, kill_step: int = 0, **over) -> subprocess.CompletedProcess:
    path = folder / f"{run}.yaml"
    path.write_text(yaml.safe_dump(_config(folder, run, **over)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    if kill_step:  # SIGKILL when the lr of step kill_step + 1 is about to be set (as tests/kill_at.py does)
        code = ("import sys; from kill_at import kill_on_call; from alphaclip_plugins.train import mllm_trainer; "
                f"kill_on_call(mllm_trainer, 'set_lr', {kill_step + 1}); "
                "from alphaclip_plugins.train.mllm_cli import main; sys.exit(main(sys.argv[1:]))")
        cmd = [sys.executable, "-c", code]
    elif nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "alphaclip_plugins.train.mllm_cli"]
    else:
        cmd = [sys.executable, "-m", "alphaclip_plugins.train.mllm_cli"]
    return subprocess.run(cmd + [str(path)], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=240)


def test_stage1_loss_falls_and_only_the_projector_changes(llava_dir):
    final = _train(llava_dir, "stage1", steps=8)
    losses = _losses(llava_dir / "stage1")
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05, losses
    before, after = read_state_dict(llava_dir / "model" / "model.safetensors"), read_state_dict(final / "model.safetensors")
    before = {portable_key(k): v for k, v in before.items()}  # the export's names, the same on every release
    assert set(before) == set(after)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("multi_modal_projector" in k for k in moved)  # the tower and LM are bit-identical
    checkpoint = Checkpointer(llava_dir / "stage1" / "checkpoints").checkpoints()[-1]
    saved = read_state_dict(checkpoint / "model.safetensors")  # only the trainable weights, as the optimizer
    assert saved and all("multi_modal_projector" in k for k in saved)
    assert len(Checkpointer(llava_dir / "stage1" / "checkpoints").read(checkpoint)[1]["state"]) == len(saved)


def test_only_assistant_tokens_are_counted(llava_dir):
    cfg = load_config(None, [f"model.path={llava_dir / 'model'}"], MLLMTrainConfig)
    _, _, collator, _ = build(cfg, torch.device("cpu"))
    from alphaclip_plugins.train.mllm_data import ConversationDataset
    from alphaclip_plugins.train.mllm_trainer import label_tokens

    dataset = ConversationDataset.from_file(llava_dir / "train.jsonl")
    batch = collator([dataset[i] for i in range(4)])
    assert label_tokens(batch) == sum(len(a.split()) + 1 for a in ANSWERS)  # each answer's words and its </s>
    tok = collator.tokenizer
    for row, answer in zip(batch["labels"], ANSWERS):
        assert tok.decode(row[row != IGNORE_INDEX][:-1]) == answer


def _logits(model, batch):
    keys = ("input_ids", "attention_mask", "pixel_values")
    with torch.no_grad():
        return model.eval()(**{k: batch[k] for k in keys}).logits


def test_lora_stage2_export_round_trips_merged(llava_dir):
    # the transformers-release venvs (scripts/hf_venvs.sh) hold no peft; the main run has it (test extra)
    import_or_skip("peft", allow_missing=True)
    over = {"model.train_lm": "lora", "model.lora_rank": 4, "model.train_tower": "alpha", "steps": 3,
            "optim.lr": 1e-2}
    final = _train(llava_dir, "lora", **over)
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in _flat(_config(llava_dir, "lora", **over))],
                      MLLMTrainConfig)
    trained, _, collator, _ = build(cfg, torch.device("cpu"))  # the unmerged LoRA model, from its last checkpoint
    checkpoint = Checkpointer(llava_dir / "lora" / "checkpoints").checkpoints()[-1]
    load_trainable(trained, read_state_dict(checkpoint / "model.safetensors"))
    assert any("lora_" in n for n, p in trained.named_parameters() if p.requires_grad)
    from alphaclip_plugins.train.mllm_data import ConversationDataset

    dataset = ConversationDataset.from_file(llava_dir / "train.jsonl")
    batch = collator([dataset[i] for i in range(4)])
    reloaded = LlavaForConditionalGeneration.from_pretrained(final)
    assert not any("lora" in k for k in reloaded.state_dict())
    processor = ahf.AlphaLlavaProcessor.from_pretrained(final)  # the processor is saved beside the model
    assert processor.image_processor.image_size == 32
    start = LlavaForConditionalGeneration.from_pretrained(llava_dir / "model")
    diff = (_logits(reloaded, batch) - _logits(trained, batch)).abs().max()
    assert diff < TOL  # LoRA merged = unmerged, and the export reloads the trained model
    assert (_logits(start, batch) - _logits(reloaded, batch)).abs().max() > 1e-3  # training changed it


def test_resume_after_sigkill_equals_uninterrupted(llava_dir):
    over = {"steps": 6, "save_every": 2, "model.train_tower": "alpha"}
    _train(llava_dir, "full", **over)  # uninterrupted, in this process
    cut = _subprocess(llava_dir, "cut", kill_step=3, **over)  # killed after step 3: resumes from step 2
    assert cut.returncode == -signal.SIGKILL
    assert [c.name for c in Checkpointer(llava_dir / "cut" / "checkpoints").checkpoints()] == ["step_00000002"]
    resumed = _subprocess(llava_dir, "cut", **over)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_state_dict(llava_dir / "full" / "final" / "model.safetensors"), read_state_dict(
        llava_dir / "cut" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(llava_dir / "full") == _losses(llava_dir / "cut")  # the logged steps once each, the same


def _trained(folder: Path, run: str):
    sd = read_state_dict(folder / run / "final" / "model.safetensors")
    return {k: v for k, v in sd.items() if "multi_modal_projector" in k}


# Adam is blind to a constant gradient scale: a large eps (and no clipping) makes the update ~ lr * grad / eps, so
# that a wrong normalisation of the loss (by world size, by micro-batch) would show.
SCALE_SENSITIVE = {"optim.eps": 10.0, "optim.lr": 3.0, "optim.grad_clip": None}


def test_two_processes_and_accumulation_equal_one_big_batch(llava_dir):
    over = {"steps": 2, "batch_size": 8, **SCALE_SENSITIVE}
    _train(llava_dir, "one", **over)
    _train(llava_dir, "accum", accum_steps=2, **over)
    two = _subprocess(llava_dir, "two", nproc=2, **over)
    assert two.returncode == 0, two.stderr[-3000:]
    one, accum, dist = _trained(llava_dir, "one"), _trained(llava_dir, "accum"), _trained(llava_dir, "two")
    start = read_state_dict(llava_dir / "model" / "model.safetensors")
    for k in one:
        assert not torch.equal(one[k], start[k])
        assert (one[k] - accum[k]).abs().max() < TOL and (one[k] - dist[k]).abs().max() < TOL, k


def test_blip2_qformer_recipe(blip2_dir):
    final = _train(blip2_dir, "qformer", steps=6, **{"optim.lr": 1e-2})
    losses = _losses(blip2_dir / "qformer")
    assert losses[-1] < losses[0] - 0.05, losses
    before, after = read_state_dict(blip2_dir / "model" / "model.safetensors"), read_state_dict(final / "model.safetensors")
    before = {portable_key(k, BLIP2_PORTABLE_KEYS): v for k, v in before.items()}  # the export's names
    assert set(before) == set(after)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("qformer.", "query_tokens", "language_projection.")) for k in moved)
    reloaded = ahf.AlphaBlip2ForConditionalGeneration.from_pretrained(final)
    cfg = load_config(None, [f"model.path={final}"], MLLMTrainConfig)
    _, _, collator, _ = build(cfg, torch.device("cpu"))
    from alphaclip_plugins.train.mllm_data import ConversationDataset

    batch = collator([ConversationDataset.from_file(blip2_dir / "train.jsonl")[i] for i in range(2)])
    assert torch.isfinite(reloaded(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                             "labels")}).loss)


def test_blip2_collator_labels_only_the_answer(blip2_dir):
    cfg = load_config(None, [f"model.path={blip2_dir / 'model'}"], MLLMTrainConfig)
    _, _, collator, _ = build(cfg, torch.device("cpu"))
    import inspect

    from transformers import Blip2Processor

    from alphaclip_plugins.train.mllm_data import ConversationDataset, ConversationSample

    dataset = ConversationDataset.from_file(blip2_dir / "train.jsonl")
    batch = collator([dataset[0], dataset[1]])
    tok = collator.tokenizer
    queries = 4 if "num_query_tokens" in inspect.signature(Blip2Processor.__init__).parameters else 0
    for row, answer in zip(range(2), ANSWERS):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        assert (ids[:queries] == IMAGE_TOKEN).all() and (labels[:queries] == IGNORE_INDEX).all()
        kept = labels != IGNORE_INDEX
        assert torch.equal(labels[kept], ids[kept]) and labels[kept][-1] == EOS
        assert tok.decode(labels[kept][:-1]) == answer  # the answer alone: not the question, not the queries
    reference = ahf.AlphaCLIPImageProcessor(image_size=32)(dataset[0].image, regions=[dataset[0].region])
    assert torch.equal(batch["pixel_values"][0], reference["pixel_values"][0])  # the one alpha-safe geometry
    multi = ConversationSample(dataset[0].image, None, [("human", "<image>\nwhat"), ("gpt", "a"), ("human", "and"),
                                                        ("gpt", "b")], "multi")
    assert collator([multi])["bad"][0][0] == "multi"


def test_gradient_checkpointing_gives_the_same_gradients(llava_dir):
    from alphaclip_plugins.train.mllm_data import ConversationDataset

    grads = []
    for flag in (False, True):
        cfg = load_config(None, [f"model.path={llava_dir / 'model'}", "model.train_lm=full", "model.train_tower=full",
                                 f"model.grad_checkpointing={flag}"], MLLMTrainConfig)
        model, _, collator, _ = build(cfg, torch.device("cpu"))
        dataset = ConversationDataset.from_file(llava_dir / "train.jsonl")
        batch = collator([dataset[i] for i in range(3)])
        model.train()(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    used = {n for n, g in grads[0].items() if g is not None}  # LLaVA reads the tower's second-to-last layer
    assert used == {n for n, g in grads[1].items() if g is not None}
    assert any("vision_tower" in n for n in used) and any("language_model" in n for n in used)
    assert max((grads[0][n] - grads[1][n]).abs().max() for n in used) < TOL


def test_config_errors_are_one_clear_line(llava_dir, capsys):
    from alphaclip_plugins.train.mllm_cli import main

    assert main([f"model.path={llava_dir / 'model'}", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown config keys ['lrr']" in err
    assert main([f"model.path={llava_dir / 'model'}", "model.train_projector=false"]) == 2
    assert "nothing would train" in capsys.readouterr().err
    assert main([f"model.path={llava_dir}", f"data.train={llava_dir / 'train.jsonl'}",
                 f"output_dir={llava_dir / 'no_model'}"]) == 2  # a folder without config.json
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no config.json" in err
    assert not (llava_dir / "no_model").exists()  # refused before output_dir was taken
    user = llava_dir / "mine"
    user.mkdir(exist_ok=True)
    with pytest.raises(RunDirError, match="was not written by this run"):
        train_mllm(load_config(None, [f"model.path={llava_dir / 'model'}", f"export.dir={user}",
                                      f"output_dir={llava_dir / 'refused'}", f"data.train={llava_dir / 'train.jsonl'}"],
                               MLLMTrainConfig))
    assert not (llava_dir / "refused").exists()  # refused before any work


@pytest.mark.slow
def test_fsdp_two_processes_equal_one(llava_dir):
    over = {"steps": 2, "batch_size": 8, "model.train_lm": "full", **SCALE_SENSITIVE, "optim.lr": 0.3}
    _train(llava_dir, "one_full", **over)
    two = _subprocess(llava_dir, "fsdp", nproc=2, **{"distributed.strategy": "fsdp", "save_every": 1}, **over)
    assert two.returncode == 0, two.stderr[-3000:]
    one = read_state_dict(llava_dir / "one_full" / "final" / "model.safetensors")
    fsdp = read_state_dict(llava_dir / "fsdp" / "final" / "model.safetensors")
    start = read_state_dict(llava_dir / "model" / "model.safetensors")
    assert any("language_model" in k and not torch.equal(one[k], start[k]) for k in one)
    assert max((one[k] - fsdp[k]).abs().max() for k in one) < TOL


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs" / "mllm").glob("*.yaml")))
def test_recipes_read_and_say_what_trains(recipe):
    cfg = load_config(ROOT / "configs" / "mllm" / recipe, ["model.path=some-model"], MLLMTrainConfig)
    m = cfg.model
    expected = {"llava_stage1.yaml": (True, "none", "none"), "llava_stage2_full.yaml": (True, "full", "none"),
                "llava_stage2_lora.yaml": (True, "lora", "alpha"), "blip2_qformer.yaml": (True, "none", "none"),
                "tiny_shapes_llava.yaml": (True, "full", "none")}
    assert (m.train_projector, m.train_lm, m.train_tower) == expected[recipe]
