"""Sample completions during training, so a user can see what the model is learning.

Every `--samples-every` steps (and on step 1, the starting point to compare with), the first
`--samples-count` prompts of the step go to RUN_DIR/samples.jsonl, one record per completion:
the prompt, the completion, its reward, and the tokens the step's selection put in the loss
with their advantages (for T-SPMO: where the group's completions branch). With --report-to
they also go to the tracker. Rank 0 alone writes, from its own shard of the step's prompts.

The trainer hands the step's groups out through its `on_selected` hook as `SelectedGroup`s:
the selection the loss used, observed, never recomputed.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .algorithms.base import Selection
from .tasks import Example


@dataclass
class SelectedGroup:
    """One prompt of a step as the loss saw it."""
    position: int  # the prompt's place in the step's batch
    example: Example
    completions: list  # its G rollout.Completion
    selection: Selection  # rows index `completions`


@dataclass
class SelectedToken:
    position: int  # 0-based in the completion's tokens
    token: str  # that token's text
    advantage: float


@dataclass
class SampleRecord:
    step: int
    prompt: str  # the task's question (before the chat template)
    answer: str
    group: int  # the prompt's place in the step's batch
    row: int  # the completion's place in its group
    completion: str
    tokens: list  # the completion's token ids (EOS included when produced)
    reward: float
    truncated: bool  # hit --max-new-tokens before EOS
    selected: list  # SelectedToken, in position order


def sample_records(step: int, groups, tokenizer) -> list:
    """One record per completion of `groups`, with the selected tokens that sit in it."""
    records = []
    for group in groups:
        chosen = {}
        for row, position, advantage in group.selection:
            chosen.setdefault(row, []).append((position, advantage))
        for row, completion in enumerate(group.completions):
            selected = [SelectedToken(position, tokenizer.decode([completion.tokens[position]]),
                                      advantage)
                        for position, advantage in sorted(chosen.get(row, []))]
            records.append(SampleRecord(step, group.example.question, str(group.example.answer),
                                        group.position, row, completion.text,
                                        list(completion.tokens), completion.reward,
                                        completion.truncated, selected))
    return records


def samples_due(done: int, every: int) -> bool:
    """Step `done` (1-based) writes samples: the first step, then every `every`-th."""
    return every > 0 and (done == 1 or done % every == 0)


@dataclass
class SampleLog:
    path: Path  # RUN_DIR/samples.jsonl
    tokenizer: object
    every: int
    count: int
    tracker: object  # tracking.Tracker

    def for_step(self, step: int):
        """The trainer's `on_selected` hook for 0-based `step`, or None when none are due."""
        if not samples_due(step + 1, self.every):
            return None

        def write(groups):
            records = sample_records(step + 1, groups[:self.count], self.tokenizer)
            with open(self.path, "a") as f:
                f.writelines(json.dumps(asdict(record)) + "\n" for record in records)
            self.tracker.log_samples(step + 1, records)

        return write
