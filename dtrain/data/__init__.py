"""Training data: local files in text / instruction / chat format -> tokenized, packed, cached `Samples`.

    from dtrain.data import prepare_data, collate
    prepared = prepare_data(cfg, tokenizer, rank=rank, world_size=world_size)  # PreparedData(train, eval, report)
    batch = collate([prepared.train[i] for i in indices], tokenizer.pad_token_id, cfg.data.seq_len, cfg.data.packing)
    loss = model(**batch, use_cache=False).loss  # use_cache=False: see dtrain.data.collate

Formats (data.datasets[i].format), read from .jsonl / .json / .parquet / .csv:
- text: {"text": ...}; bos + text + eos, every token trained (continued pre-training).
- instruction: {"instruction", "input" (optional), "output"}; the prompt is data.instruction_template, only the
  output and eos are trained.
- chat: {"messages": [{"role", "content"}, ...]}: optional system, then user/assistant turns ending with an
  assistant reply, rendered by the tokenizer's chat template (or data.chat_template); only assistant replies are
  trained, found through the template's {% generation %} markers or, without them, by rendering prefixes.
  sharegpt files: messages_field: conversations, role_field: from, content_field: value (human/gpt understood).

Call the model with use_cache=False: with a KV cache transformers skips the packed-sequence detection and packed
documents attend to each other.
"""

from dtrain.data.collate import Batcher, collate, prefetched, varlen_kwargs
from dtrain.data.errors import DataError, RowError
from dtrain.data.formats import IGNORE
from dtrain.data.grouping import group_by_length
from dtrain.data.prepare import PreparedData, prepare_command, prepare_data
from dtrain.data.report import DatasetReport, PrepareReport, SplitReport
from dtrain.data.samples import Samples

__all__ = [
    "IGNORE",
    "Batcher",
    "DataError",
    "DatasetReport",
    "PrepareReport",
    "PreparedData",
    "RowError",
    "Samples",
    "SplitReport",
    "collate",
    "group_by_length",
    "prepare_command",
    "prefetched",
    "prepare_data",
    "varlen_kwargs",
]
