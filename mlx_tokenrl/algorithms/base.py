"""What every algorithm is made of, and what it is given: the interface of algorithms/.

An algorithm is one module that builds an `Algorithm`: its name (`--algo`), its options
(each declared once as an `Option`: the TrainConfig field, so the CLI flag and the YAML key,
its help and its range come from that declaration), how it selects loss tokens from one
group (`select`), what `--loss-norm sequence` averages over, and an optional replay hook
that adds groups to a step. The config (and so `--help`) reads the registry: algorithm
modules import numpy inside the functions that use it (~0.1 s), and nothing heavier.
"""

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

STD_EPS = 1e-4


@dataclass
class GroupRecord:
    """One prompt's group as its rollout left it: what a selection may read."""
    context: list  # prompt tokens (plus a replayed prefix)
    completions: list  # G lists of sampled token ids, EOS included when produced
    rewards: list  # G floats
    # Per token of each completion, recorded while sampling from the logits the sampler
    # already had, under the model's own distribution (temperature 1, no top-p): the policy
    # the loss's ratio is of (its old log-probs come from the first update's own forward,
    # not from these). None unless the algorithm asks for them
    # (`Algorithm.needs_token_stats`), since they cost a softmax per decoded token.
    logprobs: list | None = None  # log pi(token)
    entropies: list | None = None  # entropy of pi at that position
    # --mask-truncated: completions that add nothing to the loss (their rewards still shape
    # the group's advantages); None: none
    masked: list | None = None

    def is_masked(self, row: int) -> bool:
        return self.masked is not None and self.masked[row]


class SelectedToken(NamedTuple):
    row: int  # the loss row (in a group: the completion) the token is read from
    position: int  # 0-based in that completion
    advantage: float


@dataclass
class Selection:
    """The tokens that enter the loss, column by column; iterating yields `SelectedToken`s."""
    rows: list = field(default_factory=list)
    positions: list = field(default_factory=list)
    advantages: list = field(default_factory=list)

    def add(self, row: int, position: int, advantage: float):
        self.rows.append(row)
        self.positions.append(position)
        self.advantages.append(float(advantage))

    def extend(self, other: "Selection", row_of=lambda row: row):
        """Append `other`'s tokens, its rows renumbered by `row_of`."""
        for row, position, advantage in other:
            self.add(row_of(row), position, advantage)

    def without_rows(self, dropped) -> "Selection":
        """The tokens not read from a row for which `dropped(row)` holds."""
        kept = Selection()
        for row, position, advantage in self:
            if not dropped(row):
                kept.add(row, position, advantage)
        return kept

    def __iter__(self):
        return map(SelectedToken._make, zip(self.rows, self.positions, self.advantages))

    def __len__(self):
        return len(self.rows)

    def __bool__(self):
        return bool(self.rows)


@dataclass(frozen=True)
class Option:
    """A setting of one algorithm: a TrainConfig field of this name, type and default, shown
    under the algorithm's panel in `train --help`, range-checked before any model work."""
    name: str
    kind: type
    default: object
    help: str
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None


def no_problem(cfg) -> str | None:
    return None


@dataclass(frozen=True)
class Algorithm:
    name: str  # its --algo value
    summary: str  # a few words for --algo's help
    select: Callable  # (GroupRecord, cfg, numpy Generator) -> Selection, rows within the group
    # What `--loss-norm sequence` averages over (loss.normalisation_weights): "completion"
    # (each completion's tokens are averaged, then the completions) or "group".
    normalised_over: str = "completion"
    options: tuple = ()  # of Option
    panel: str = ""  # where its options appear in --help
    check: Callable = no_problem  # cfg -> a message when its options do not fit together
    # (model, tokenizer, task, cfg, step, world, groups, solved, prompts, answers, indices,
    # positions) -> replay.ReplayGroup list: groups it adds to the step, selected like the rest.
    replay: Callable | None = None
    needs_token_stats: bool = False  # its selection reads GroupRecord.logprobs/entropies


def group_advantages(rewards, scale_rewards: bool = True):
    """GRPO's A_i = (r_i - mean r) / (std r + eps); population std (ddof=0)."""
    import numpy as np

    rewards = np.asarray(rewards, dtype=np.float64)
    centred = rewards - rewards.mean()
    if scale_rewards:
        centred = centred / (rewards.std() + STD_EPS)
    return centred


def has_signal(rewards) -> bool:
    import numpy as np

    rewards = np.asarray(rewards, dtype=np.float64)
    return rewards.size > 1 and bool(np.ptp(rewards) > 0)


def scaled(cfg) -> bool:
    """`--scale-rewards group`: advantages divided by the group's std."""
    return cfg.scale_rewards == "group"


def per_completion(record: GroupRecord, cfg, positions_of) -> Selection:
    """GRPO's group advantage of each completion on the positions `positions_of(row)` of it;
    nothing for a group without signal (it costs no forward pass in the loss)."""
    selection = Selection()
    if not has_signal(record.rewards):
        return selection
    advantages = group_advantages(record.rewards, scaled(cfg))
    for row in range(len(record.completions)):
        for pos in positions_of(row):
            selection.add(row, pos, advantages[row])
    return selection
