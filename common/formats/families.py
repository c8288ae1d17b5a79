"""Model families: how a dense public model maps onto its mixture-of-experts form.

Each family is a small adapter (key names, config mapping, router semantics); the pipeline
(training model, extraction, assembly, opt-out) is shared and never forks per family.

| dense ``model_type`` | MoE ``model_type`` | router weights                                   |
|----------------------|--------------------|--------------------------------------------------|
| ``olmo2``            | ``flex_olmo``      | softmax over all, top-k, not renormalised        |
| ``llama``            | ``mixtral``        | softmax over all, top-k, renormalised to sum 1   |
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from flexfed.common.errors import UnsupportedModelError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoEKey:
    """A parsed MoE tensor name: the router of a layer, or one projection of one expert."""

    layer: int
    expert: int | None  # None for the router
    proj: str | None  # one of PROJECTIONS; None for the router


class ModelFamily(ABC):
    """Adapter between a dense public family and the HF MoE class that holds its experts."""

    dense_model_type: ClassVar[str]
    moe_model_type: ClassVar[str]
    moe_architecture: ClassVar[str]
    renormalizes_topk: ClassVar[bool]
    # Dense config keys the MoE class has no field for, with the only values it can honour.
    dropped_keys: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def dense_ffn_key(self, layer: int, proj: str) -> str:
        return f"model.layers.{layer}.mlp.{proj}.weight"

    @abstractmethod
    def moe_expert_key(self, layer: int, expert: int, proj: str) -> str:
        """On-disk key of one projection of one expert (as ``save_pretrained`` writes it)."""

    @abstractmethod
    def moe_router_key(self, layer: int) -> str:
        """On-disk key of a layer's router matrix, shape (E, hidden)."""

    @abstractmethod
    def _moe_fields(self, num_experts: int, top_k: int) -> dict[str, Any]:
        """The config fields that make the MoE model (expert count, top-k, router)."""

    @abstractmethod
    def parse_moe_key(self, key: str) -> MoEKey | None:
        """Parse an MoE checkpoint key; None for shared (non-expert) tensors."""

    def is_dense_ffn_key(self, key: str) -> bool:
        return (
            re.fullmatch(r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight", key) is not None
        )

    def check_dense_config(self, config: dict[str, Any]) -> None:
        """Refuse dense configs whose features the MoE class cannot reproduce exactly."""
        for key, allowed in self.dropped_keys.items():
            if key in config and config[key] not in allowed:
                raise UnsupportedModelError(
                    f"{self.dense_model_type} models with {key}={config[key]!r} cannot be "
                    f"expressed as {self.moe_model_type} (needs {key} in {list(allowed)})"
                )
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(
                f"hidden_act={config['hidden_act']!r} is not supported (needs 'silu')"
            )

    def moe_config(self, dense: dict[str, Any], num_experts: int, top_k: int) -> dict[str, Any]:
        """The MoE config.json for a dense config.json, E experts and top-k."""
        if dense.get("model_type") != self.dense_model_type:
            raise UnsupportedModelError(
                f"expected a {self.dense_model_type} config, got {dense.get('model_type')!r}"
            )
        self.check_dense_config(dense)
        if not 1 <= top_k <= num_experts:
            raise UnsupportedModelError(f"top-k must be in 1..{num_experts}, got {top_k}")
        cfg = {k: v for k, v in dense.items() if k not in self.dropped_keys}
        cfg.pop("_name_or_path", None)
        cfg["model_type"] = self.moe_model_type
        cfg["architectures"] = [self.moe_architecture]
        cfg.update(self._moe_fields(num_experts, top_k))
        return cfg

    def with_experts(self, moe: dict[str, Any], num_experts: int, top_k: int) -> dict[str, Any]:
        """An MoE config with a new expert count and top-k, everything else unchanged."""
        cfg = dict(moe)
        cfg.update(self._moe_fields(num_experts, top_k))
        return cfg

    @abstractmethod
    def moe_shape(self, moe: dict[str, Any]) -> tuple[int, int]:
        """(num_experts, top_k) of an MoE config."""


class Olmo2Family(ModelFamily):
    """OLMo-2 -> FlexOlmo, as in the paper (post-norm blocks; scale of the mix is irrelevant)."""

    dense_model_type = "olmo2"
    moe_model_type = "flex_olmo"
    moe_architecture = "FlexOlmoForCausalLM"
    renormalizes_topk = False

    _key = re.compile(r"model\.layers\.(\d+)\.mlp\.(?:gate|experts\.(\d+)\.(\w+_proj))\.weight")

    def moe_expert_key(self, layer: int, expert: int, proj: str) -> str:
        return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"

    def moe_router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.weight"

    def _moe_fields(self, num_experts: int, top_k: int) -> dict[str, Any]:
        return {
            "num_experts": num_experts,
            "num_experts_per_tok": top_k,
            "norm_topk_prob": False,
            "output_router_logits": False,
        }

    def moe_shape(self, moe: dict[str, Any]) -> tuple[int, int]:
        return int(moe["num_experts"]), int(moe["num_experts_per_tok"])

    def parse_moe_key(self, key: str) -> MoEKey | None:
        m = self._key.fullmatch(key)
        if m is None:
            return None
        if m.group(2) is None:
            return MoEKey(int(m.group(1)), None, None)
        if m.group(3) not in PROJECTIONS:
            return None
        return MoEKey(int(m.group(1)), int(m.group(2)), m.group(3))


class LlamaFamily(ModelFamily):
    """Llama (SmolLM2, ...) -> Mixtral: pre-norm blocks need mixing weights that sum to 1."""

    dense_model_type = "llama"
    moe_model_type = "mixtral"
    moe_architecture = "MixtralForCausalLM"
    renormalizes_topk = True
    dropped_keys: ClassVar[dict[str, tuple[Any, ...]]] = {
        "mlp_bias": (False,),
        "attention_bias": (False,),
        "pretraining_tp": (1,),
    }

    # Mixtral's on-disk names: w1 = gate, w3 = up, w2 = down.
    _to_mixtral: ClassVar[dict[str, str]] = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    _from_mixtral: ClassVar[dict[str, str]] = {v: k for k, v in _to_mixtral.items()}
    _key = re.compile(
        r"model\.layers\.(\d+)\.block_sparse_moe\.(?:gate|experts\.(\d+)\.(w[123]))\.weight"
    )

    def moe_expert_key(self, layer: int, expert: int, proj: str) -> str:
        w = self._to_mixtral[proj]
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"

    def moe_router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe.gate.weight"

    def _moe_fields(self, num_experts: int, top_k: int) -> dict[str, Any]:
        return {
            "num_local_experts": num_experts,
            "num_experts_per_tok": top_k,
            "output_router_logits": False,
            "router_jitter_noise": 0.0,
            "sliding_window": None,
        }

    def moe_shape(self, moe: dict[str, Any]) -> tuple[int, int]:
        return int(moe["num_local_experts"]), int(moe["num_experts_per_tok"])

    def parse_moe_key(self, key: str) -> MoEKey | None:
        m = self._key.fullmatch(key)
        if m is None:
            return None
        if m.group(2) is None:
            return MoEKey(int(m.group(1)), None, None)
        return MoEKey(int(m.group(1)), int(m.group(2)), self._from_mixtral[m.group(3)])


FAMILIES: dict[str, ModelFamily] = {f.dense_model_type: f for f in (Olmo2Family(), LlamaFamily())}
_BY_MOE_TYPE: dict[str, ModelFamily] = {f.moe_model_type: f for f in FAMILIES.values()}


def family_named(name: str) -> ModelFamily:
    """The family of a dense ``model_type`` (``olmo2``, ``llama``)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported model family {name!r}; supported: {', '.join(sorted(FAMILIES))}"
        ) from None


def family_of_config(config: dict[str, Any]) -> tuple[ModelFamily, bool]:
    """(family, is_moe) for a config.json of a dense or an assembled model."""
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type], False
    if model_type in _BY_MOE_TYPE:
        return _BY_MOE_TYPE[model_type], True
    supported = sorted([*FAMILIES, *_BY_MOE_TYPE])
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; supported: {', '.join(supported)}"
    )
