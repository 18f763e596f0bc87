"""The embedded tiny region-aware LLaVA, built from parts: the tiny-shapes Alpha-CLIP tower, a projector and a
tiny Llama with a word-level tokenizer, as a transformers ``LlavaForConditionalGeneration``.

* Vision: the embedded Alpha-CLIP (``alphaclip_plugins/assets/tiny-shapes``: 64 px, 8 px patches, width 64)
  loaded through :func:`~.export.load_alpha_weights` into the HF alpha tower that :func:`~.llava.alphafy_llava`
  uses. The LM reads the last layer's tokens, class token included (``vision_feature_select_strategy="full"``):
  that token is what the tower was trained to make region-aware.
* Projector: LLaVA's two-layer MLP, from random weights.
* LM: a 2-layer Llama of width 64 from random weights, over a word-level vocabulary (:data:`VOCAB`) in a
  ``PreTrainedTokenizerFast`` with a chat template (``USER: ... ASSISTANT: ...</s>``), so the collator's
  chat-template path builds the prompts and ``AutoTokenizer`` loads it.

``alphaclip train-mllm configs/mllm/tiny_shapes_llava.yaml`` trains projector and LM on synthetic region
conversations (``train/mllm_synthetic.py``) and exports ``alphaclip_plugins/assets/tiny-shapes-llava``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from ...core.factory import DEFAULT_MODEL_DIR
from ...core.io import PathLike
from .export import _read, hf_configs, load_alpha_weights
from .llava import AlphaLlavaProcessor, _llava_core

#: Where the trained model ships.
TINY_LLAVA_DIR = Path(__file__).resolve().parents[2] / "assets" / "tiny-shapes-llava"
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
#: The words the tokenizer knows (lower case; punctuation is split off): the prompt template's, the
#: synthetic questions' and the answers'. Other words become ``<unk>``.
VOCAB: List[str] = SPECIAL + ["user", "assistant", ":", "?", ".", ",", "a", "an", "the", "and", "what", "is", "in",
                              "this", "that", "highlighted", "region", "shape", "name", "describe", "which", "object",
                              "there", "of", "colour", "color",
                              # the synthetic shapes (train/synthetic.py COLOURS, SHAPES)
                              "red", "green", "blue", "yellow", "purple", "circle", "square", "triangle", "cross"]
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
                 "{% elif m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + m['content'] + eos_token + ' ' }}"
                 "{% else %}{{ m['content'] + ' ' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def word_tokenizer(words: Optional[List[str]] = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (lower-cased, punctuation split off) with :data:`CHAT_TEMPLATE`.

    Args:
        words: the vocabulary, the five special tokens first (``<pad> <unk> <s> </s> <image>``); default :data:`VOCAB`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    words = list(words or VOCAB)
    if words[: len(SPECIAL)] != SPECIAL:
        raise ValueError(f"the vocabulary must start with the special tokens {SPECIAL}; got {words[:5]}")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "region?" -> "region", "?"; offsets stay exact
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces, " ?" -> "?"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left")
    fast.add_tokens(SPECIAL, special_tokens=True)  # kept whole: "circle</s>" is two tokens
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llava(
    vision: PathLike = DEFAULT_MODEL_DIR, hidden_size: int = 64, layers: int = 2, heads: int = 4,
    intermediate_size: int = 256, feature_layer: int = -1, seed: int = 0,
) -> Tuple[LlavaForConditionalGeneration, AlphaLlavaProcessor]:
    """A LLaVA with an Alpha-CLIP tower from ``vision`` and a random tiny Llama, and its processor.

    Args:
        vision: an Alpha-CLIP ``save_pretrained`` directory or checkpoint (any layout the core reads); default the
            embedded tiny-shapes model.
        hidden_size, layers, heads, intermediate_size: the Llama's sizes.
        feature_layer: the tower layer whose tokens (class token and patches) the LM reads.
        seed: seeds the random projector and LM.

    Returns:
        ``(model, processor)``; the model takes ``pixel_values [B, 4, S, S]`` and ``input_ids [B, L]``.
    """
    from . import register

    register()
    weights, cfg = _read(vision)
    if cfg is None:
        from ...core.weights import infer_config

        cfg = infer_config(weights)
    vision_cfg, _ = hf_configs(cfg)
    tokenizer = word_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=256, pad_token_id=ids("<pad>"), bos_token_id=ids("<s>"),
                       eos_token_id=ids("</s>"), tie_word_embeddings=False)
    patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    config = LlavaConfig(vision_config=vision_cfg, text_config=text, image_token_index=ids("<image>"),
                         vision_feature_select_strategy="full", vision_feature_layer=feature_layer,
                         image_seq_length=patches + 1, pad_token_id=ids("<pad>"))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    load_alpha_weights(_llava_core(model).vision_tower, weights.state_dict)
    _set_generation_defaults(model, tokenizer)
    return model.eval(), AlphaLlavaProcessor.from_model(model, tokenizer)


def _set_generation_defaults(model: Any, tokenizer: PreTrainedTokenizerFast) -> None:
    """Greedy decoding that stops at ``</s>`` and pads with ``<pad>``: what ``generate()`` does unasked."""
    gen = model.generation_config
    gen.do_sample, gen.num_beams, gen.max_new_tokens = False, 1, 8
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = (tokenizer.eos_token_id, tokenizer.pad_token_id,
                                                            tokenizer.bos_token_id)


def ensure_tiny_llava(directory: PathLike, **kwargs: Any) -> Path:
    """Write :func:`build_tiny_llava`'s untrained model and processor to ``directory`` unless a model is there
    (``train-mllm``'s ``model.build: tiny_shapes_llava``: the run starts from it). Written all-or-nothing."""
    from ...core.io import atomic_directory
    from ...train.mllm_export import save_portable

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    model, processor = build_tiny_llava(**kwargs)
    with atomic_directory(directory, False, marker="config.json") as tmp:
        save_portable(model, [processor], tmp)
    return directory
