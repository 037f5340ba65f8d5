"""Data for emlab: fine-tuning chat sets (demo, files, protected archives) and the gold set.

- `demo`: seeded synthetic narrow-domain sets (`bad_medical_advice`, `good_medical_advice`,
  `risky_financial_advice`, `safe_financial_advice`) — research artefacts for studying EM.
- `chat`: `load_chat_dataset(spec, seed=...)` resolves `demo:<name>` or a JSONL path and
  validates every row, naming file and line on the first problem.
- `protected`: `unprotect_dataset(...)` for files shipped with `easy-dataset-share`.
- `gold`: `load_gold_set()` — human-labelled answers for checking a judge.
"""

from .chat import (
    DEMO_DATA_SEED,
    ROLES,
    ChatDataset,
    ChatRow,
    load_chat_dataset,
    read_chat_jsonl,
    resolve_dataset_path,
    validate_chat_row,
)
from .demo import (
    DEFAULT_DEMO_ROWS,
    DemoDatasetInfo,
    demo_dataset_info,
    demo_dataset_names,
    generate_demo_dataset,
    write_demo_dataset,
)
from .gold import (
    DEFAULT_GOLD_PATH,
    GOLD_LABELS,
    GoldItem,
    GoldLabel,
    gold_subset,
    load_gold_set,
)
from .protected import unprotect_dataset

__all__ = [
    "DEFAULT_DEMO_ROWS",
    "DEFAULT_GOLD_PATH",
    "DEMO_DATA_SEED",
    "GOLD_LABELS",
    "ROLES",
    "ChatDataset",
    "ChatRow",
    "DemoDatasetInfo",
    "GoldItem",
    "GoldLabel",
    "demo_dataset_info",
    "demo_dataset_names",
    "generate_demo_dataset",
    "load_chat_dataset",
    "gold_subset",
    "load_gold_set",
    "read_chat_jsonl",
    "resolve_dataset_path",
    "unprotect_dataset",
    "validate_chat_row",
    "write_demo_dataset",
]
