"""Which head answers a task of a merged encoder classifier: its expert's own, or the merged
zero-padded head sliced to the task's labels? Prints the held-out accuracy of a TIES merge of
the encoder zoo's four experts both ways (README, "Encoder classifiers").

    .venv/bin/python scripts/encoder_heads.py [ENCODER_ZOO_DIR]   # default ./encoder-zoo
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import torch

    from mergeopt.blocks import BlockLayout
    from mergeopt.merge.engine import MergeEngine
    from mergeopt.objectives.scorers.classifier import ClassifierScorer
    from mergeopt.zoo.encoder import TIES_MERGE, EncoderZoo
    from mergeopt.zoo.encoder_tasks import LABEL_COUNTS

    zoo = EncoderZoo.from_dir(Path(sys.argv[1] if len(sys.argv) > 1 else "encoder-zoo"))
    torch.set_num_threads(1)
    tasks = list(LABEL_COUNTS)
    experts = [zoo.experts[task] for task in tasks]
    scorer = ClassifierScorer(model_dir=zoo.base, batch_size=256, expert_dirs=experts)
    engine = MergeEngine(
        base=zoo.base,
        experts=experts,
        layout=BlockLayout.fixed(scorer.model.config.num_hidden_layers, num_blocks=1),
        method=str(TIES_MERGE["method"]),
    )
    params = {k: float(v) for k, v in TIES_MERGE.items() if k != "method"}
    engine.merge([[params] * len(tasks)] * 2, target=scorer.merge_target())
    records = {
        t: [json.loads(x) for x in zoo.tasks[f"{t}.heldout"].read_text().splitlines()]
        for t in tasks
    }

    def accuracy(task: str, logits: list[list[float]]) -> float:
        labels = [r["label"] for r in records[task]]
        predicted = [max(range(LABEL_COUNTS[task]), key=row.__getitem__) for row in logits]
        return sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels)

    def texts(task: str) -> tuple[list[str], list[str | None]]:
        return [r["text"] for r in records[task]], [r.get("text_pair") for r in records[task]]

    shared = {}
    for task in tasks:  # the merged padded head: before any expert's head is put in
        first, pairs = texts(task)
        shared[task] = accuracy(task, scorer._guarded(first, pairs))  # noqa: SLF001
    own = {
        task: accuracy(task, scorer.classify(*texts(task), head=i)) for i, task in enumerate(tasks)
    }
    print("| TIES merge, each task answered by | " + " | ".join(tasks) + " |")
    print("|---" * (len(tasks) + 1) + "|")
    print("| its expert's head | " + " | ".join(f"{own[t]:.3f}" for t in tasks) + " |")
    print(
        "| the merged padded head, sliced | " + " | ".join(f"{shared[t]:.3f}" for t in tasks) + " |"
    )


if __name__ == "__main__":
    main()
