"""Generate from an assembled model with a per-request expert set.

One model is loaded once; each request names the slots it drops, and the model is masked
with :func:`flexfed.common.moe.optout.masked_experts` for that request only, so what it
computes is exactly what the opted-out checkpoint computes (tested bit for bit). Masking swaps
the MoE tensors of the shared model in place, so requests run one at a time under a lock:
this is a reference server for pilots and audits; production serving maps the same policy
onto vLLM (docs/serving.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from flexfed.common.moe.optout import AssembledModel, masked_experts
from flexfed.common.moe.recipe import resolve_device
from flexfed.common.serving.policy import ExpertPolicy, PolicyError, Slot, slots_from_assembly


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens: greedy when temperature is 0."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= 4096:
            raise PolicyError(f"max_tokens must be in 1..4096, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise PolicyError(f"temperature must be in 0..2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise PolicyError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    experts: tuple[str, ...]


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class Engine:
    """A loaded assembled model that answers completions under expert policies."""

    def __init__(
        self, model_dir: Path | str, device: str = "auto", default: ExpertPolicy | None = None
    ) -> None:
        self.path = Path(model_dir)
        assembled = AssembledModel(self.path)  # refuses dense models and broken assembly.json
        self.slots: list[Slot] = slots_from_assembly(assembled.assembly)
        self.anchor_digest = str(assembled.assembly.get("anchor_digest"))
        self.default = default or ExpertPolicy()
        self.default.drop_slots(self.slots)  # a server default naming unknown orgs fails now
        self.device = resolve_device(device)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(self.path)
        model: nn.Module = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        self.model: Any = model.to(self.device).eval()
        self._lock = threading.Lock()

    def plan(self, policy: ExpertPolicy) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """The slots a request drops (server default included) and the experts it keeps."""
        drop = self.default.merged(policy).drop_slots(self.slots)
        kept = tuple(s.label for s in self.slots if s.index not in drop)
        return drop, kept

    def _masked(self, drop: Sequence[int]) -> AbstractContextManager[Any]:
        return masked_experts(self.model, drop) if drop else nullcontext(self.model)

    def _generate_kwargs(self, ids: torch.Tensor, sampling: Sampling) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": sampling.max_tokens,
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        }
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False)
        return kwargs

    def _encode(self, prompt: str) -> torch.Tensor:
        ids: torch.Tensor = self.tokenizer(prompt, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise PolicyError("the prompt is empty")
        return ids.to(self.device)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, policy: ExpertPolicy) -> torch.Tensor:
        """The model's logits for ``ids`` under ``policy`` (what the invariant test compares)."""
        drop, _ = self.plan(policy)
        with self._lock, self._masked(drop):
            out: torch.Tensor = self.model(ids.to(self.device)).logits
            return out.detach().cpu()

    def complete(self, prompt: str, sampling: Sampling, policy: ExpertPolicy) -> Completion:
        drop, kept = self.plan(policy)
        ids = self._encode(prompt)
        with self._lock, self._masked(drop), torch.no_grad():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            out = self.model.generate(**self._generate_kwargs(ids, sampling))
        new = out[0, ids.shape[1] :]
        text, stopped = _cut_at_stop(
            self.tokenizer.decode(new, skip_special_tokens=True), sampling.stop
        )
        eos = self.tokenizer.eos_token_id
        ended = stopped or (len(new) > 0 and eos is not None and int(new[-1]) == eos)
        return Completion(
            text=text,
            prompt_tokens=int(ids.shape[1]),
            completion_tokens=len(new),
            finish_reason="stop" if ended or len(new) < sampling.max_tokens else "length",
            experts=kept,
        )

    def stream(
        self, prompt: str, sampling: Sampling, policy: ExpertPolicy
    ) -> tuple[tuple[str, ...], Iterator[tuple[str, str | None]]]:
        """The kept experts, and an iterator of (text piece, finish reason on the last)."""
        drop, kept = self.plan(policy)
        ids = self._encode(prompt)
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600.0
        )
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock, self._masked(drop), torch.no_grad():
                    if sampling.seed is not None:
                        torch.manual_seed(sampling.seed)
                    self.model.generate(**self._generate_kwargs(ids, sampling), streamer=streamer)
            except BaseException as exc:  # handed to the reader below
                errors.append(exc)
                streamer.end()  # type: ignore[no-untyped-call]

        def pieces() -> Iterator[tuple[str, str | None]]:
            worker = threading.Thread(target=run, name="flexfed-generate", daemon=True)
            started = time.monotonic()
            worker.start()
            text = ""
            for piece in streamer:
                cut, stopped = _cut_at_stop(text + piece, sampling.stop)
                if cut[len(text) :]:
                    yield cut[len(text) :], None
                text = cut
                if stopped:
                    worker.join()  # the model stays locked until generate ends
                    yield "", "stop"
                    return
            worker.join(timeout=max(1.0, 600.0 - (time.monotonic() - started)))
            if errors:
                raise errors[0]
            yield (
                "",
                "length" if len(self.tokenizer(text).input_ids) >= sampling.max_tokens else "stop",
            )

        return kept, pieces()
