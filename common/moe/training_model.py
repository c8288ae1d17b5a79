"""The 2-expert training model of FlexOlmo, and extracting the trained expert from it.

Every FFN of the public model becomes a 2-expert MoE [public FFN, new FFN]:

    logits = [r_pub·x, r_i·x + min(b_i, 0)]          # (B, T, 2)
    p      = softmax(logits)                          # both experts active (top-2 of 2)
    y      = p_0 · FFN_pub(x) + p_1 · FFN_i(x)

The new FFN starts as a copy of the public one. Only the new FFN, r_i and b_i are trainable;
everything else (embeddings, attention and its norms, all norms, lm_head, the public FFN and
r_pub) is frozen, so it stays bit-identical to the anchor.

The owner's expert is its own module rather than a slice of a fused tensor, so freezing is
``requires_grad=False`` and needs no gradient masks. For both families top-2 of 2 weights
already sum to 1, so the same module serves the renormalising (Mixtral) and the
non-renormalising (FlexOlmo) router.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from flexfed.common.errors import InvalidInputError, UnsupportedModelError
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.bundle import expert_key
from flexfed.common.formats.families import PROJECTIONS


class TwoExpertFFN(nn.Module):
    """[public FFN, owner FFN] with the FlexOlmo router and the negative-bias trick."""

    def __init__(
        self,
        public: nn.Module,
        r_pub: torch.Tensor,
        r_init: torch.Tensor,
        bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.public = public.requires_grad_(False)
        self.expert = copy.deepcopy(public).requires_grad_(True)
        dtype = next(public.parameters()).dtype
        self.router_pub = nn.Parameter(r_pub.detach().clone().to(dtype), requires_grad=False)
        self.router = nn.Parameter(r_init.detach().clone().to(dtype))  # r_i, (H,)
        self.bias = nn.Parameter(torch.full((1,), float(bias_init), dtype=dtype))  # b_i
        self.z_loss: torch.Tensor | None = None  # set by every forward, read by the trainer

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T, 2): [r_pub·x, r_i·x + min(b_i, 0)]."""
        logit_pub = x @ self.router_pub  # (B, T)
        logit_own = x @ self.router + self.bias.clamp(max=0.0)  # (B, T)
        return torch.stack([logit_pub, logit_own], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router_logits(x).float()  # (B, T, 2)
        # Router z-loss term: mean over tokens of logsumexp(logits)^2.
        self.z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        p = F.softmax(logits, dim=-1).to(x.dtype)  # (B, T, 2)
        # NOTE: typed because nn.Module.__call__ returns Any.
        y: torch.Tensor = p[..., 0:1] * self.public(x) + p[..., 1:2] * self.expert(x)  # (B, T, H)
        return y


def _layers(model: PreTrainedModel) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no model.layers")
    return layers


def two_expert_layers(model: PreTrainedModel) -> Iterator[TwoExpertFFN]:
    for layer in _layers(model):
        mlp = layer.mlp
        if not isinstance(mlp, TwoExpertFFN):
            raise InvalidInputError("not a training model (its MLPs are not TwoExpertFFN)")
        yield mlp


def build_training_model(
    anchor: Anchor,
    router_init: Sequence[torch.Tensor] | None = None,
    bias_init: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> PreTrainedModel:
    """Load the anchor's dense model and turn every FFN into a :class:`TwoExpertFFN`.

    ``router_init`` gives r_i per layer (domain-informed init); by default r_i = r_pub.
    """
    n = anchor.shapes.num_layers
    if router_init is not None and len(router_init) != n:
        raise InvalidInputError(f"router_init needs {n} vectors, got {len(router_init)}")
    model = AutoModelForCausalLM.from_pretrained(anchor.path, dtype=dtype)
    model.requires_grad_(False)
    for idx, layer in enumerate(_layers(model)):
        r_pub = anchor.r_pub(idx)
        r_init = router_init[idx] if router_init is not None else r_pub
        if tuple(r_init.shape) != (anchor.shapes.hidden_size,):
            raise InvalidInputError(f"router_init[{idx}] has shape {list(r_init.shape)}")
        mlp = layer.mlp
        if not isinstance(mlp, nn.Module):
            raise UnsupportedModelError(f"{type(model).__name__} layer {idx} has no MLP module")
        layer.mlp = TwoExpertFFN(mlp, r_pub, r_init, bias_init)
    model.to(device)  # type: ignore[arg-type]  # transformers' @wraps'd .to
    return model


def trainable_parameters(model: PreTrainedModel) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def router_z_loss(model: PreTrainedModel) -> torch.Tensor:
    """Mean over layers of the z-loss of the last forward pass."""
    terms = [m.z_loss for m in two_expert_layers(model) if m.z_loss is not None]
    if not terms:
        raise InvalidInputError("router_z_loss() needs a forward pass first")
    return torch.stack(terms).mean()


def z_loss_term(model: PreTrainedModel, weight: float) -> Callable[[], torch.Tensor]:
    """The recipe's extra loss for expert training: ``weight`` x the router z-loss, read after
    each forward pass (for :func:`flexfed.common.moe.recipe.accumulate_gradients`)."""
    return lambda: weight * router_z_loss(model)


def extract_expert(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The owner's expert, with family-neutral names (expert.safetensors' contents)."""
    out: dict[str, torch.Tensor] = {}
    for idx, mlp in enumerate(two_expert_layers(model)):
        for proj in PROJECTIONS:
            weight = getattr(mlp.expert, proj).weight
            out[expert_key(idx, f"{proj}.weight")] = weight.detach().cpu().clone()
        out[expert_key(idx, "router.weight")] = mlp.router.detach().cpu().clone()
        out[expert_key(idx, "router.bias")] = mlp.bias.detach().cpu().clone()
    return out
