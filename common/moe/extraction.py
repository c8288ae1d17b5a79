"""Training-data extraction: the standard attack, measured (the paper's privacy analysis).

For each candidate document the attacker feeds the model its first ``prefix`` tokens and
decodes ``suffix`` tokens greedily; the document counts as extracted when the continuation
equals the true next ``suffix`` tokens exactly (Carlini et al., 2021/2023; FlexOlmo Section 6
reports this rate for the public model, a dense fine-tune and FlexOlmo). We also report the
mean share of suffix tokens that match position by position, which moves before the exact
rate does at small scale.

Run it on documents the model was (or was not) trained on: the difference between the two is
memorisation, not the domain's predictability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from flexfed.common.errors import DataError


@dataclass(frozen=True)
class ExtractionResult:
    documents: int
    prefix_tokens: int
    suffix_tokens: int
    extracted: int  # documents whose suffix was reproduced exactly
    token_match: float  # mean share of suffix positions reproduced

    @property
    def rate(self) -> float:
        return self.extracted / self.documents if self.documents else float("nan")


def candidates(
    docs: Sequence[str], tokenizer: PreTrainedTokenizerBase, prefix: int, suffix: int
) -> torch.Tensor:
    """(n, prefix + suffix): the first tokens of every document long enough, in order."""
    need = prefix + suffix
    rows = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False).input_ids
        if len(ids) >= need:
            rows.append(ids[:need])
    if not rows:
        raise DataError(f"no document has the {need} tokens the attack needs")
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def extraction(
    model: nn.Module, samples: torch.Tensor, prefix: int, batch_size: int = 16
) -> ExtractionResult:
    """Greedy-decode each sample's suffix from its prefix; count exact reproductions.

    Decoding runs the full forward pass per new token (no cache, no early stop at an
    end-of-text token), so every model is attacked the same way whatever its generation
    settings.
    """
    if not 0 < prefix < samples.shape[1]:
        raise DataError(f"prefix must be in 1..{samples.shape[1] - 1}, got {prefix}")
    suffix = samples.shape[1] - prefix
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    extracted, matched = 0, 0.0
    for start in range(0, len(samples), batch_size):
        rows = samples[start : start + batch_size].to(device)
        ids = rows[:, :prefix]
        for _ in range(suffix):
            logits = model(input_ids=ids).logits[:, -1, :]
            ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
        same = ids[:, prefix:] == rows[:, prefix:]  # (b, suffix)
        extracted += int(same.all(dim=1).sum())
        matched += float(same.float().mean(dim=1).sum())
    model.train(was)
    return ExtractionResult(
        documents=len(samples),
        prefix_tokens=prefix,
        suffix_tokens=suffix,
        extracted=extracted,
        token_match=matched / len(samples),
    )
