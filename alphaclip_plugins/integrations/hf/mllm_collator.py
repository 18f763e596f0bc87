"""Region conversations -> LLaVA batches: prompts, 4-channel pixel values, labels on the assistant's tokens.

:class:`RegionConversationCollator` turns the samples of ``alphaclip_plugins.train.mllm_data`` (decoded
image, region mask, ``(role, text)`` turns) into what transformers' ``LlavaForConditionalGeneration``
takes, through an :class:`~.llava.AlphaLlavaProcessor`:

* the prompt is the tokenizer's (or processor's) chat template when it has one, else LLaVA-1.5's
  ``llava_v1`` conversation (``"<system> USER: <image>\\n... ASSISTANT: ...</s>USER: ..."``);
* ``pixel_values [B, 4, S, S]`` come from the processor's :class:`AlphaCLIPImageProcessor` (the core
  ``RegionProcessor`` geometry: image and mask resized together, never an RGBA PIL resize);
* ``labels`` are -100 except on the tokens of every assistant turn and its end-of-turn token, found by the
  tokens' character offsets (a fast tokenizer is needed);
* padding is on the right for training, on the left for generation (``generation=True``: the last answer is
  dropped, the generation prompt added, and the answers returned as ``targets``).

Samples that cannot be used (a :class:`BadSample`, or a prompt too long for ``max_length``) are skipped:
the batch lists them in ``bad`` as ``(name, reason)`` and counts ``tried``, as the trainer's streams do.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
from transformers import LlavaForConditionalGeneration

from . import compat
from .llava import AlphaLlavaProcessor

if TYPE_CHECKING:  # the samples' types; duck-typed at run time (name, reason / image, region, turns, name)
    from ...train.mllm_data import ConversationSample

Template = Literal["auto", "chat", "llava_v1"]
IGNORE_INDEX = -100
#: LLaVA-1.5's system prompt (``conv_llava_v1``).
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "labels")
Span = Tuple[int, int]  # [start, end) characters of an assistant turn in the prompt


def _merge_finds_images_by_zero_embeddings() -> bool:
    """Whether this release's LLaVA takes all-zero embeddings for image slots (4.37's does): there a pad token
    whose embedding is zero (Llama's ``padding_idx`` row) breaks every padded batch, so padding uses eos."""
    merge = getattr(LlavaForConditionalGeneration, "_merge_input_ids_with_image_features", None)
    try:
        return merge is not None and "final_embedding == 0" in inspect.getsource(merge)
    except (OSError, TypeError):
        return False


PAD_WITH_EOS = _merge_finds_images_by_zero_embeddings()


def model_inputs(batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The keys of a collated batch that the model takes (``model(**model_inputs(batch))``)."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def llava_v1_prompt(turns: Sequence[Tuple[str, str]], eos: str, system: str = LLAVA_V1_SYSTEM,
                    generation: bool = False) -> Tuple[str, List[Span]]:
    """LLaVA's ``llava_v1`` conversation: ``"SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>"``.

    Returns:
        The prompt and the character spans of the assistant's answers, each with its ``eos``. With
        ``generation`` the turns end with a question and the prompt with ``"ASSISTANT:"``.
    """
    text, spans = (system + " ") if system else "", []
    for role, value in turns:
        if role == "human":
            text += f"USER: {value} "
        else:
            text += "ASSISTANT: "
            spans.append((len(text), len(text) + len(value) + len(eos)))
            text += value + eos
    return (text + "ASSISTANT:" if generation else text), spans


def _strip(text: str, start: int, end: int) -> Span:
    """Narrow ``[start, end)`` so that it neither starts nor ends with whitespace."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


class ChatPrompter:
    """Prompts from a chat template, with the assistant spans read off renders of the conversation's prefixes.

    A template that takes content as a list of parts (``{"type": "image"}``, ``{"type": "text"}``, as
    llava-hf's do) is detected by rendering a probe, and gets the ``<image>`` as an image part.
    """

    def __init__(self, tokenizer: Any, template: str, image_token: str, system: Optional[str] = None):
        self.tokenizer, self.template, self.image_token, self.system = tokenizer, template, image_token, system
        probe = "zq_probe_zq"
        try:
            self.parts = probe not in self._render([{"role": "user", "content": probe}], False)
        except Exception:  # a parts template may fail on a string (jinja raises many types)
            self.parts = True

    def _render(self, messages: List[Dict[str, Any]], generation: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation)

    def _message(self, role: str, text: str) -> Dict[str, Any]:
        role = "user" if role == "human" else "assistant"
        if not self.parts:
            return {"role": role, "content": text}
        content: List[Dict[str, Any]] = []
        if self.image_token in text:
            content.append({"type": "image"})
            text = text.replace(self.image_token, "").strip()
        return {"role": role, "content": content + [{"type": "text", "text": text}]}

    def __call__(self, turns: Sequence[Tuple[str, str]], generation: bool = False) -> Tuple[str, List[Span]]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [self._message(role, text) for role, text in turns]
        if generation:
            return self._render(messages, True), []
        full, spans = self._render(messages, False), []
        offset = len(messages) - len(turns)
        for k, (role, _) in enumerate(turns):
            if role != "gpt":
                continue
            before = self._render(messages[: offset + k], True)
            after = self._render(messages[: offset + k + 1], False)
            if not (full.startswith(before) and full.startswith(after) and len(after) > len(before)):
                raise ValueError(
                    "the chat template does not render a conversation's turns as prefixes of the whole, so the "
                    "assistant's tokens cannot be found; use template='llava_v1' (or a template that does)"
                )
            spans.append(_strip(full, len(before), len(after)))
        if full.count(self.image_token) != 1:
            raise ValueError(f"the chat template rendered {full.count(self.image_token)} {self.image_token} tokens "
                             f"for one image; it must keep the image where the conversation puts it")
        return full, spans


class RegionConversationCollator:
    """Collate region conversations into ``LlavaForConditionalGeneration`` batches.

    Args:
        processor: an :class:`AlphaLlavaProcessor` (``AlphaLlavaProcessor.from_model(model, tokenizer)``) with
            a fast tokenizer.
        template: ``"auto"`` (the chat template if the tokenizer or processor has one, else ``"llava_v1"``),
            ``"chat"`` or ``"llava_v1"``.
        system: the system prompt; None = LLaVA-1.5's for ``llava_v1``, none for a chat template.
        generation: drop each sample's last answer and end with the generation prompt (no ``labels``; the
            answers come back as ``targets``).
        padding_side: ``"right"`` or ``"left"``; None = left for generation, right for training.
        max_length: truncate longer prompts on the right; a sample that would lose image tokens or every
            answer token is skipped.
        pad_token_id: the id padding uses (the attention mask hides it); None = the tokenizer's pad token, or
            eos where it has none or where the installed LLaVA mistakes zero pad embeddings for image slots (4.37).

    Calling it on a list of :class:`ConversationSample` / :class:`BadSample` gives ``input_ids [B, L]``,
    ``attention_mask [B, L]``, ``pixel_values [B, 4, S, S]``, ``labels [B, L]`` (training), ``names``,
    ``targets`` (generation), ``bad`` and ``tried``; with no usable sample, only the last four.
    """

    def __init__(self, processor: AlphaLlavaProcessor, template: Template = "auto", system: Optional[str] = None,
                 generation: bool = False, padding_side: Optional[Literal["left", "right"]] = None,
                 max_length: Optional[int] = None, pad_token_id: Optional[int] = None):
        tokenizer = processor.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the collator finds the assistant's tokens by character offsets, which need a fast "
                             "tokenizer; load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        if template not in ("auto", "chat", "llava_v1"):
            raise ValueError(f"template must be 'auto', 'chat' or 'llava_v1'; got {template!r}")
        source = getattr(tokenizer, "chat_template", None) or getattr(processor, "chat_template", None)
        if template == "chat" and not source:
            raise ValueError("template='chat' but neither the tokenizer nor the processor has a chat_template; "
                             "set one, or use template='llava_v1'")
        self.processor, self.tokenizer, self.generation, self.max_length = processor, tokenizer, generation, max_length
        self.padding_side = padding_side or ("left" if generation else "right")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right'; got {self.padding_side!r}")
        self.image_token = processor.image_token if hasattr(processor, "image_token") else "<image>"
        self.chat = ChatPrompter(tokenizer, source, self.image_token, system) if (template != "llava_v1" and source) else None
        self.system = LLAVA_V1_SYSTEM if system is None else system
        pad = pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if (PAD_WITH_EOS or tokenizer.pad_token_id is None) else tokenizer.pad_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token or pass "
                             "pad_token_id")
        self.pad_id = int(pad)

    def prompt(self, turns: Sequence[Tuple[str, str]]) -> Tuple[str, List[Span]]:
        """The prompt of one conversation and its assistant spans (none for generation)."""
        turns = list(turns[:-1]) if self.generation else list(turns)
        if self.chat is not None:
            return self.chat(turns, self.generation)
        return llava_v1_prompt(turns, self.tokenizer.eos_token or "", self.system, self.generation)

    def encode(self, sample: "ConversationSample") -> Dict[str, Any]:
        """One sample -> ``input_ids``, ``labels`` (lists) and ``pixel_values [4, S, S]``.

        Raises:
            ValueError: the prompt is too long for ``max_length``, or the region does not fit the image.
        """
        text, spans = self.prompt(sample.turns)
        bos = self.tokenizer.bos_token
        out = self.processor(images=[sample.image], text=[text], regions=[sample.region], return_offsets_mapping=True,
                             add_special_tokens=not (bos and text.startswith(bos)))
        ids, offsets = list(out["input_ids"][0]), [tuple(o) for o in out["offset_mapping"][0]]
        token = self.image_token
        if compat.LLAVA_PROCESSOR_EXPANDS:  # the processor expanded <image> into n tokens: move the spans with it
            extra = (self.processor._image_tokens(out["pixel_values"]) - 1) * len(token)
            spans = [(s + extra * text[:s].count(token), e + extra * text[:e].count(token)) for s, e in spans]
        labels = [i if any(a < e and b > s for s, e in spans) and b > a else IGNORE_INDEX
                  for i, (a, b) in zip(ids, offsets)]
        if self.max_length is not None and len(ids) > self.max_length:
            image_id = self.tokenizer.convert_tokens_to_ids(token)
            if ids[self.max_length:].count(image_id):
                raise ValueError(f"the prompt takes {len(ids)} tokens; max_length={self.max_length} would cut its image")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if not self.generation and all(t == IGNORE_INDEX for t in labels):
            raise ValueError(f"no answer token is left within max_length={self.max_length}")
        return {"input_ids": ids, "labels": labels, "pixel_values": out["pixel_values"][0]}

    def _pad(self, rows: List[List[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        padded = [r + [value] * (width - len(r)) if self.padding_side == "right" else [value] * (width - len(r)) + r
                  for r in rows]
        return torch.tensor(padded, dtype=torch.long)

    def __call__(self, items: Sequence[Any]) -> Dict[str, Any]:
        encoded, names, targets, bad = [], [], [], []
        for item in items:
            if hasattr(item, "reason"):  # a BadSample
                bad.append((item.name, item.reason))
                continue
            try:
                encoded.append(self.encode(item))
            except ValueError as e:
                bad.append((item.name, str(e)))
                continue
            names.append(item.name)
            targets.append(item.turns[-1][1])
        batch: Dict[str, Any] = {"names": names, "bad": bad, "tried": len(items)}
        if self.generation:
            batch["targets"] = targets
        if not encoded:
            return batch
        ids = [e["input_ids"] for e in encoded]
        batch["input_ids"] = self._pad(ids, self.pad_id)
        batch["attention_mask"] = self._pad([[1] * len(r) for r in ids], 0)
        batch["pixel_values"] = torch.stack([e["pixel_values"] for e in encoded])
        if not self.generation:
            batch["labels"] = self._pad([e["labels"] for e in encoded], IGNORE_INDEX)
        return batch
