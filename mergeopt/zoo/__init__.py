"""The model zoo: a base causal LM and two experts fine-tuned briefly from it, trained on the CPU
in about two minutes, whose merges behave like merges of real fine-tunes.

Zoo v2 reproduces SIPBMM's pair (Qwen3-4B Instruct and Thinking, both post-trained briefly from
one strong base; arXiv 2512.09972) in miniature:

- ``base`` was pretrained on the skills themselves — 2-digit additions, answered directly or
  with a bracketed trace (more often the more carries a sum needs), and word reversals — so it
  is competent at both tasks and knows both answer styles (greedy, it answers directly);
- ``expert-direct`` is the base fine-tuned briefly, at a small learning rate, to answer sums
  with the bare number (``" 132\\n"``) and to reverse words: short answers, moderate accuracy;
- ``expert-steps`` is the base fine-tuned the same way to always trace (``" [7+5=12, 4+8+1=13]
  132\\n"``): far more accurate at sums, five times the tokens, no better at reversal.

Their task vectors are a few percent of the base's weights (``zoo.json`` records
‖τ‖/‖θ‖), so merges of them are working models between the two, as merges of real fine-tunes
are; ``scripts/zoo_landscape.py`` measures that and records it in ``zoo.json``.

Every model is a ``Qwen2ForCausalLM`` (8 layers, hidden 128, 2 query heads and 1 key/value head
of head_dim 64, untied embeddings) over a character vocabulary, saved as safetensors with its
tokenizer so that ``AutoModelForCausalLM``/``AutoTokenizer`` and vLLM load the folders as they
are. The same seed on the same machine gives identical weights.

Layout written by :func:`build_zoo` (a contract other modules and the tests rely on)::

    out_dir/base/, out_dir/expert-direct/, out_dir/expert-steps/   HF model folders
    out_dir/tasks/arith.jsonl, arith.heldout.jsonl       {"prompt", "answer"}
    out_dir/tasks/reverse.jsonl, reverse.heldout.jsonl   {"prompt", "answer"}
    out_dir/tasks/arith_mc.jsonl     {"question", "choices": [4 strings], "answer": index}
    out_dir/tasks/texts.jsonl        {"text"}
    out_dir/zoo.json                 version, seed, recipe (the ZooTraining), scores, seconds
                                     (+ "landscape")

``zoo.json`` is written last, after the finished folder was renamed into place, so a folder
with a readable ``zoo.json`` is a complete zoo.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergeopt.errors import UserError
from mergeopt.zoo.build import ExpertTraining, ZooTraining
from mergeopt.zoo.tasks import (
    arith_direct_answer,
    arith_prompt,
    arith_steps_answer,
    read_jsonl,
    reverse_prompt,
)

__all__ = [
    "BASE_NAME",
    "EXPERT_NAMES",
    "TASK_FILES",
    "ZOO_JSON",
    "ZOO_VERSION",
    "ExpertTraining",
    "ZooInfo",
    "ZooTraining",
    "arith_direct_answer",
    "arith_prompt",
    "arith_steps_answer",
    "build_zoo",
    "up_to_date_zoo",
    "read_jsonl",
    "reverse_prompt",
]

# Bump whenever the training, the data or the layout changes: tests cache builds by this string.
ZOO_VERSION = "2"

BASE_NAME = "base"
EXPERT_NAMES = ("expert-direct", "expert-steps")
TASK_FILES = {
    "arith": "arith.jsonl",
    "arith.heldout": "arith.heldout.jsonl",
    "reverse": "reverse.jsonl",
    "reverse.heldout": "reverse.heldout.jsonl",
    "arith_mc": "arith_mc.jsonl",
    "texts": "texts.jsonl",
}
ZOO_JSON = "zoo.json"


@dataclass(frozen=True, kw_only=True)
class ZooInfo:
    """Where the parts of a built zoo lie.

    Attributes:
        root: the zoo folder.
        base: the base model folder.
        experts: expert name (``"expert-direct"``, ``"expert-steps"``) -> model folder.
        tasks: task name (``"arith"``, ``"arith.heldout"``, ``"reverse"``,
            ``"reverse.heldout"``, ``"arith_mc"``, ``"texts"``) -> JSONL file.
        metadata: the content of ``zoo.json`` (version, seed, ``recipe``: the ``ZooTraining``,
            scores, build seconds).
    """

    root: Path
    base: Path
    experts: dict[str, Path]
    tasks: dict[str, Path]
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, root: Path) -> ZooInfo:
        """The zoo built in ``root``; UserError unless its ``zoo.json`` marks it complete."""
        root = Path(root)
        try:
            metadata = json.loads((root / ZOO_JSON).read_text())
        except (OSError, ValueError) as error:
            raise UserError(
                f"{root}: not a complete model zoo ({ZOO_JSON} unreadable: {error}); "
                "build it with `mergeopt zoo build`"
            ) from error
        return cls(
            root=root,
            base=root / BASE_NAME,
            experts={name: root / name for name in EXPERT_NAMES},
            tasks={task: root / "tasks" / file for task, file in TASK_FILES.items()},
            metadata=metadata,
        )

    def is_up_to_date(self, *, seed: int, training: ZooTraining) -> bool:
        """Whether this zoo is what ``build_zoo(seed=seed, training=training)`` would build now."""
        return (
            self.metadata.get("zoo_version") == ZOO_VERSION
            and self.metadata.get("seed") == seed
            and self.metadata.get("recipe") == json.loads(json.dumps(asdict(training)))
        )


def up_to_date_zoo(
    out_dir: Path, *, seed: int = 0, training: ZooTraining | None = None
) -> ZooInfo | None:
    """The zoo in ``out_dir`` when it is complete and built by this version, seed and training."""
    try:
        info = ZooInfo.from_dir(Path(out_dir))
    except UserError:
        return None
    return info if info.is_up_to_date(seed=seed, training=training or ZooTraining()) else None


def build_zoo(
    out_dir: Path,
    *,
    seed: int = 0,
    progress: bool = True,
    training: ZooTraining | None = None,
    device: str = "cpu",
) -> ZooInfo:
    """Train the zoo into ``out_dir`` (see the module docstring for what it holds), on the CPU
    unless ``device`` names another (then seeded but not bit-reproducible).

    An existing zoo (or a half-built one) in ``out_dir`` is replaced; any other non-empty
    folder is refused with a UserError. The models are built in a temporary sibling folder
    that is renamed into place, and ``zoo.json`` is written last. Progress goes to stderr: a
    bar per stage on a terminal, timestamped lines otherwise.

    Example:
        >>> info = build_zoo(Path("zoo"), progress=False)  # doctest: +SKIP
        >>> info.metadata["models"]["expert-steps"]["arith"]["accuracy"]  # doctest: +SKIP
    """
    from mergeopt.progress import stages
    from mergeopt.zoo.build import build, write_metadata

    out_dir = Path(out_dir).absolute()
    with stages(progress) as reporter:
        metadata = build(
            out_dir,
            seed=seed,
            training=training or ZooTraining(),
            progress=reporter,
            version=ZOO_VERSION,
            device=device,
        )
    return write_metadata(out_dir, metadata)
