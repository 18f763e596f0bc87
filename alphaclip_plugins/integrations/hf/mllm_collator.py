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


def span_labels(ids: Sequence[int], offsets: Sequence[Tuple[int, int]], spans: Sequence[Span]) -> List[int]:
    """Labels of a tokenized prompt: the token id inside an answer's character span, else ``IGNORE_INDEX``."""
    return [i if any(a < e and b > s for s, e in spans) and b > a else IGNORE_INDEX for i, (a, b) in zip(ids, offsets)]


class _Batcher:
    """The batching both collators share: per-sample :meth:`encode`, skips listed in ``bad``, padding.

    Subclasses set ``generation``, ``padding_side`` and ``pad_id`` and define ``encode(sample)`` (a dict of
    ``input_ids``, ``labels`` lists and ``pixel_values [4, S, S]``; ValueError for an unusable sample).
    """

    generation: bool
    padding_side: str
    pad_id: int

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
        return self.stack(encoded, names, bad, len(items), targets)

    def stack(self, encoded: List[Dict[str, Any]], names: List[str], bad: List[Tuple[str, str]], tried: int,
              targets: Optional[List[str]] = None) -> Dict[str, Any]:
        """Pad and stack :meth:`encode` results into a batch (the keys listed in the class docstring)."""
        batch: Dict[str, Any] = {"names": names, "bad": bad, "tried": tried}
        if self.generation:
            batch["targets"] = targets or []
        if not encoded:
            return batch
        ids = [e["input_ids"] for e in encoded]
        batch["input_ids"] = self._pad(ids, self.pad_id)
        batch["attention_mask"] = self._pad([[1] * len(r) for r in ids], 0)
        batch["pixel_values"] = torch.stack([e["pixel_values"] for e in encoded])
        if not self.generation:
            batch["labels"] = self._pad([e["labels"] for e in encoded], IGNORE_INDEX)
        return batch


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


class RegionConversationCollator(_Batcher):
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
        labels = span_labels(ids, offsets, spans)
        if self.max_length is not None and len(ids) > self.max_length:
            image_id = self.tokenizer.convert_tokens_to_ids(token)
            if ids[self.max_length:].count(image_id):
                raise ValueError(f"the prompt takes {len(ids)} tokens; max_length={self.max_length} would cut its image")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if not self.generation and all(t == IGNORE_INDEX for t in labels):
            raise ValueError(f"no answer token is left within max_length={self.max_length}")
        return {"input_ids": ids, "labels": labels, "pixel_values": out["pixel_values"][0]}


def _blip2_prompt_holds_queries() -> bool:
    """Whether this release's BLIP-2 reads its query outputs into ``num_query_tokens`` image tokens at the front
    of ``input_ids`` (its ``Blip2Processor`` puts them there: 4.4x on); older ones prepend the outputs themselves."""
    from transformers import Blip2Processor

    return "num_query_tokens" in inspect.signature(Blip2Processor.__init__).parameters


class RegionCaptionCollator(_Batcher):
    """Collate region conversations into :class:`~.blip2.AlphaBlip2ForConditionalGeneration` batches.

    A sample's first question (its ``<image>`` removed; ``prompt`` where nothing is left) and first answer
    become ``"<question> <answer><eos>"``; labels are -100 except on the answer and its eos, as in
    :class:`RegionConversationCollator`, with which it shares the batching. Pixel values come from an
    :class:`AlphaCLIPImageProcessor`, the package's one alpha-safe geometry. Where the release wants them,
    ``num_query_tokens`` image tokens start each prompt (outside the loss).

    Args:
        image_processor: an :class:`AlphaCLIPImageProcessor` of the tower's size.
        tokenizer: the language model's fast tokenizer.
        config: the model's config (``num_query_tokens``, ``image_token_index``).
        prompt: the text before the answer when a question is only ``<image>``.
        generation: the prompt without the answer, left-padded; the answers come back as ``targets``.
    """

    def __init__(self, image_processor: Any, tokenizer: Any, config: Any, prompt: str = "a photo of",
                 generation: bool = False, max_length: Optional[int] = None,
                 padding_side: Optional[Literal["left", "right"]] = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the collator finds the answer's tokens by character offsets, which need a fast "
                             "tokenizer; load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        self.image_processor, self.tokenizer, self.prompt, self.max_length = image_processor, tokenizer, prompt, max_length
        self.generation = generation
        self.padding_side = padding_side or ("left" if generation else "right")
        self.queries = [int(config.image_token_index)] * config.num_query_tokens if (
            _blip2_prompt_holds_queries() and getattr(config, "image_token_index", None) is not None) else []
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        self.pad_id = int(pad)

    def text(self, turns: Sequence[Tuple[str, str]]) -> Tuple[str, List[Span]]:
        """The prompt (and answer, unless ``generation``) of a one-question sample, and the answer's span."""
        if len(turns) != 2:
            raise ValueError(f"BLIP-2 learns one question and one answer per sample; this one has {len(turns)} "
                             f"turns (split the conversation into samples)")
        question = turns[0][1].replace("<image>", "").strip() or self.prompt
        if self.generation:
            return question, []
        answer = turns[1][1].strip() + (self.tokenizer.eos_token or "")
        return f"{question} {answer}", [(len(question) + 1, len(question) + 1 + len(answer))]

    def encode(self, sample: "ConversationSample") -> Dict[str, Any]:
        """One sample -> ``input_ids``, ``labels`` (lists) and ``pixel_values [4, S, S]``."""
        text, spans = self.text(sample.turns)
        out = self.tokenizer(text, return_offsets_mapping=True)
        ids = self.queries + list(out["input_ids"])
        labels = [IGNORE_INDEX] * len(self.queries) + span_labels(out["input_ids"], out["offset_mapping"], spans)
        if self.max_length is not None and len(ids) > self.max_length:
            if self.max_length <= len(self.queries):
                raise ValueError(f"max_length={self.max_length} would cut the {len(self.queries)} query tokens")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if not self.generation and all(t == IGNORE_INDEX for t in labels):
            raise ValueError(f"no answer token is left within max_length={self.max_length}")
        pixels = self.image_processor(sample.image, regions=[sample.region], return_tensors="pt")["pixel_values"]
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels[0]}
