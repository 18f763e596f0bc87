"""Region conversations as a deterministic, resumable stream of collated MLLM micro-batches.

The region trainer's :class:`~.streams.MapStream` does the ordering (a seeded permutation per epoch; global
micro-batch ``k`` is the same samples for any world size, so 2 processes see what 1 process sees), the
resume position (micro-batches consumed) and the replacement of unreadable samples by seeded others. Here
a sample is decoded by ``mllm_data`` and encoded by the model's collator; a sample the collator refuses
(too long for ``max_length``) is skipped as an unreadable one is, and both are listed in the batch's ``bad``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from torch.utils.data import DataLoader

from .data import DataError, SampleError
from .loader import DataState
from .mllm_config import MLLMDataConfig
from .mllm_data import ConversationRecord, decode_conversation, read_conversations
from .streams import MapStream


class ConversationStream(MapStream):
    """Micro-batches of one rank, collated by ``collator`` (``encode`` + ``stack``, as the HF collators have).

    Args:
        records: the region conversations.
        collator: a :class:`RegionConversationCollator` or :class:`RegionCaptionCollator`.
        batch_size, rank, world_size, seed, start: as :class:`MapStream`'s.
    """

    def __init__(self, records: Sequence[ConversationRecord], collator: Any, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, start: int = 0):
        super().__init__(records, None, batch_size, rank, world_size, seed, 0.0, start)  # type: ignore[arg-type]
        self.collator = collator

    def decode(self, rec: ConversationRecord, rng: np.random.Generator) -> Tuple[Dict[str, Any], str]:
        sample = decode_conversation(rec)
        try:
            return self.collator.encode(sample), rec.name
        except ValueError as e:  # the prompt does not fit max_length, or the region does not fit the image
            raise SampleError(str(e)) from None

    def collate(self, samples: List[Any], bad: List[Tuple[str, str]], k: int) -> Dict[str, Any]:
        batch = self.collator.stack([s[0] for s in samples], [s[1] for s in samples], bad, len(samples) + len(bad))
        return {**batch, "index": k}


def make_loader(cfg: MLLMDataConfig, collator: Any, batch_size: int, rank: int, world_size: int, seed: int,
                state: DataState) -> DataLoader:
    """An endless DataLoader of this rank's micro-batches, starting at ``state``.

    Raises:
        DataError: ``data.train`` is unset, missing, or holds no sample.
    """
    if cfg.train is None:
        raise DataError("data.train is not set; point it at a JSONL (or JSON list) of region conversations")
    try:
        records = read_conversations(cfg.train, cfg.image_root)
    except FileNotFoundError:
        raise DataError(f"data file {cfg.train} does not exist; check data.train") from None
    except SampleError as e:
        raise DataError(str(e)) from None
    if not records:
        raise DataError(f"{cfg.train} holds no sample")
    stream = ConversationStream(records, collator, batch_size, rank, world_size, seed, state.batches)
    return DataLoader(stream, batch_size=None, num_workers=cfg.num_workers, persistent_workers=False,
                      prefetch_factor=4 if cfg.num_workers else None)
