"""Structured pruning of a decoder model into a smaller model of the same architecture.

Three cuts, each optional, each ranked by importance measured on calibration text:

- depth: keep `num_hidden_layers` layers, dropping those that change the hidden state least (block
  influence, 1 - cosine(layer input, layer output), as in ShortGPT, arXiv:2403.03853);
- MLP width: keep `intermediate_size` channels per layer, those whose contribution to the MLP's output
  is largest (mean |activation| into down_proj x the norm of its down_proj column);
- attention width: keep `num_key_value_heads` key/value groups per layer, each with its query heads (so
  grouped-query attention stays valid), ranked by the norm of their contribution to o_proj's output.

The kept rows and columns are sliced out of the state dict and loaded strictly into a model built from
the shrunk config, so the result is an ordinary checkpoint that `from_pretrained` loads and whose config
counts match its weights. torch-pruning could find the coupled dimensions too, but for this one layout
(q/k/v/o and gate/up/down projections, as in Llama, Mistral, Qwen2/3, Gemma 2, SmolLM) slicing by name
is shorter than its dependency graph and keeps the model's own class.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from trellis.compress.arguments import PruneArguments
from trellis.core.errors import TrellisError

logger = logging.getLogger(__name__)


class PruningError(TrellisError):
    """A recipe or a model the pruning stage cannot work with; the message says why and what to do."""


_LAYER = re.compile(r"^(model\.layers)\.(\d+)\.(.+)$")
_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def check_model(config, cuts: dict[str, int]) -> None:
    """The cuts fit the model's config: each a size it has, at most as large. A PruningError otherwise,
    before any weights load (check_layout checks the layers once they are loaded)."""
    for key, value in cuts.items():
        have = getattr(config, key, None)
        if have is None:
            raise PruningError(
                f"{key}: the model's config ({config.model_type}) has no {key}; this stage "
                "prunes decoder models with Llama-style layers"
            )
        if value > have:
            raise PruningError(
                f"{key}: {value} is more than the model has ({have}); set it to at most {have}"
            )
    if "num_key_value_heads" in cuts:
        # transformers refuses a config whose query heads do not divide its hidden size, head_dim or not
        per_group = config.num_attention_heads // config.num_key_value_heads
        fits = [
            n for n in range(1, config.num_key_value_heads + 1) if config.hidden_size % (n * per_group) == 0
        ]
        if cuts["num_key_value_heads"] not in fits:
            raise PruningError(
                f"num_key_value_heads: {cuts['num_key_value_heads']} groups keep "
                f"{cuts['num_key_value_heads'] * per_group} query heads, which do not divide the hidden size "
                f"({config.hidden_size}), and transformers refuses such a config; pick one of {fits}"
            )


@dataclass
class Importance:
    """Per layer: block influence, MLP channel scores and key/value group scores (higher: keep)."""

    layers: list[float]
    channels: list  # a tensor of intermediate_size scores per layer
    groups: list  # a tensor of num_key_value_heads scores per layer


def measure_importance(model, samples: list[dict]) -> Importance:
    """Run the calibration samples through the model, recording what each layer, channel and head adds."""
    import torch

    config = model.config
    layers = model.model.layers
    head_dim = _head_dim(config)
    heads_per_group = config.num_attention_heads // config.num_key_value_heads
    influence = [0.0] * len(layers)
    channel_sums = [torch.zeros(config.intermediate_size, dtype=torch.float64) for _ in layers]
    group_sums = [torch.zeros(config.num_key_value_heads, dtype=torch.float64) for _ in layers]
    tokens = 0
    handles = []

    def layer_hook(index):
        def hook(module, args, kwargs, output):
            before = (args[0] if args else kwargs["hidden_states"]).float()
            after = (output[0] if isinstance(output, tuple) else output).float()
            cosine = torch.nn.functional.cosine_similarity(before, after, dim=-1)
            influence[index] += float((1 - cosine).sum())

        return hook

    def down_hook(index, weight):
        def hook(module, args):
            # a channel's share of the output: its activation's size times its column's norm
            activations = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).sum(0)
            channel_sums[index] += (activations * weight.float().norm(dim=0)).double()

        return hook

    def o_hook(index, weight):
        def hook(module, args):
            x = args[0].detach().float()  # (batch, tokens, heads x head_dim)
            per_head = x.reshape(*x.shape[:-1], config.num_attention_heads, head_dim)
            w = weight.float().reshape(weight.shape[0], config.num_attention_heads, head_dim)
            # each head's contribution to o_proj's output, and its norm per token
            contribution = torch.einsum("bthd,ohd->btho", per_head, w).norm(dim=-1).sum((0, 1))
            group_sums[index] += contribution.reshape(-1, heads_per_group).sum(-1).double()

        return hook

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(layer_hook(index), with_kwargs=True))
        handles.append(
            layer.mlp.down_proj.register_forward_pre_hook(down_hook(index, layer.mlp.down_proj.weight))
        )
        handles.append(
            layer.self_attn.o_proj.register_forward_pre_hook(o_hook(index, layer.self_attn.o_proj.weight))
        )
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model.eval()
            for sample in samples:
                model(**{key: value.to(device) for key, value in sample.items()})
                tokens += int(sample["input_ids"].numel())
    finally:
        for handle in handles:
            handle.remove()
    return Importance(
        layers=[value / tokens for value in influence],
        channels=[values / tokens for values in channel_sums],
        groups=[values / tokens for values in group_sums],
    )


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass
class Plan:
    """What stays: the kept layers (original indices) and, per kept layer, its MLP channels and
    key/value groups (ascending indices)."""

    layers: list[int]
    channels: dict[int, list[int]]
    groups: dict[int, list[int]]


def plan(config, importance: Importance, cuts: dict[str, int]) -> Plan:
    """Keep the most important of each kind, in their original order."""
    import torch

    def top(scores, count: int) -> list[int]:
        scores = torch.as_tensor(scores, dtype=torch.float64)
        return sorted(torch.topk(scores, count).indices.tolist())

    layers = top(importance.layers, cuts.get("num_hidden_layers", config.num_hidden_layers))
    channels = {
        i: top(importance.channels[i], cuts.get("intermediate_size", config.intermediate_size))
        for i in layers
    }
    groups = {
        i: top(importance.groups[i], cuts.get("num_key_value_heads", config.num_key_value_heads))
        for i in layers
    }
    return Plan(layers, channels, groups)


def pruned_config(config, plan: Plan):
    """A copy of the config with the kept counts (head_dim made explicit: it no longer follows from the
    hidden size over the heads)."""
    new = config.__class__.from_dict(config.to_dict())
    first = plan.layers[0]
    heads_per_group = config.num_attention_heads // config.num_key_value_heads
    new.head_dim = _head_dim(config)
    new.num_hidden_layers = len(plan.layers)
    new.intermediate_size = len(plan.channels[first])
    new.num_key_value_heads = len(plan.groups[first])
    new.num_attention_heads = new.num_key_value_heads * heads_per_group
    if getattr(config, "layer_types", None):  # sliding-window and full attention layers keep their kinds
        new.layer_types = [config.layer_types[i] for i in plan.layers]
    return new


def pruned_state_dict(state: dict, config, plan: Plan) -> dict:
    """The state dict of the pruned model: kept layers renumbered, projections sliced to the kept
    channels and heads; everything outside the layers as it was."""
    import torch

    head_dim = _head_dim(config)
    heads_per_group = config.num_attention_heads // config.num_key_value_heads
    new_index = {old: new for new, old in enumerate(plan.layers)}
    pruned = {}
    for name, tensor in state.items():
        match = _LAYER.match(name)
        if not match:
            pruned[name] = tensor
            continue
        old = int(match.group(2))
        if old not in new_index:
            continue
        rest = match.group(3)
        channels = torch.tensor(plan.channels[old])
        groups = plan.groups[old]
        kv_rows = torch.tensor([g * head_dim + d for g in groups for d in range(head_dim)])
        query_heads = [g * heads_per_group + h for g in groups for h in range(heads_per_group)]
        q_rows = torch.tensor([q * head_dim + d for q in query_heads for d in range(head_dim)])
        if rest.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            tensor = tensor.index_select(0, channels)
        elif rest == "mlp.down_proj.weight":
            tensor = tensor.index_select(1, channels)
        elif rest.startswith("self_attn.q_proj."):
            tensor = tensor.index_select(0, q_rows)
        elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            tensor = tensor.index_select(0, kv_rows)
        elif rest == "self_attn.o_proj.weight":
            tensor = tensor.index_select(1, q_rows)
        pruned[f"{match.group(1)}.{new_index[old]}.{rest}"] = tensor.contiguous()
    return pruned


def check_layout(model) -> None:
    """Every layer has the projections this stage slices; a PruningError naming the first missing."""
    names = {name for name, _ in model.named_parameters()}
    if not any(_LAYER.match(name) for name in names):
        raise PruningError(
            f"{model.config.model_type}: no model.layers.<i> parameters; this stage prunes "
            "decoder models with Llama-style layers"
        )
    for index in range(model.config.num_hidden_layers):
        for projection in _PROJECTIONS:
            if f"model.layers.{index}.{projection}.weight" not in names:
                raise PruningError(
                    f"{model.config.model_type}: layer {index} has no {projection}; this stage "
                    "prunes q/k/v/o and gate/up/down projections"
                )


def prune(model, importance: Importance, cuts: dict[str, int]):
    """The pruned model: built from the shrunk config, the sliced weights loaded strictly."""
    from transformers import AutoModelForCausalLM

    kept = plan(model.config, importance, cuts)
    config = pruned_config(model.config, kept)
    state = pruned_state_dict(model.state_dict(), model.config, kept)
    pruned = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    pruned.load_state_dict(state, strict=True)  # a shape the config does not match fails here
    pruned.tie_weights()
    logger.info(
        "Pruned: layers %s of %d kept; %d of %d MLP channels; %d of %d key/value groups; %d -> %d parameters",
        kept.layers,
        model.config.num_hidden_layers,
        config.intermediate_size,
        model.config.intermediate_size,
        config.num_key_value_heads,
        model.config.num_key_value_heads,
        model.num_parameters(),
        pruned.num_parameters(),
    )
    return pruned, kept


# --- loading, measuring, reporting ---------------------------------------------------------------------


def load_config(args: PruneArguments):
    """The model's config, without its weights: enough to check the cuts before the heavy work."""
    from transformers import AutoConfig

    from trellis.core.recipe import local_path_problem

    if message := local_path_problem(args.model_name_or_path, "model directory"):
        raise PruningError(f"model_name_or_path: {message}")
    return AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)


def load_model(args: PruneArguments):
    from transformers import AutoModelForCausalLM

    from trellis.train.models import torch_dtype

    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path,
        dtype=torch_dtype(args.dtype),
        trust_remote_code=args.trust_remote_code,
        use_safetensors=True,
    )
    check_layout(model)
    return model.eval()


def build_report(
    args: PruneArguments, original, pruned, tokenizer, importance: Importance, kept: Plan
) -> dict:
    """Both models' parameters and held-out perplexity, what was kept, and the scores that decided it."""
    from trellis.evaluate.perplexity import perplexity_metrics

    models = {}
    for name, model in (("original", original), ("pruned", pruned)):
        metrics = {"parameters": model.num_parameters()}
        for item in args.perplexity:
            metrics.update(perplexity_metrics(model, tokenizer, item, args.batch_size))
        models[name] = metrics
    models["pruned"]["parameter_share"] = models["pruned"]["parameters"] / models["original"]["parameters"]
    return {
        "model": args.model_name_or_path,
        "cuts": args.cuts(),
        "models": models,
        "kept_layers": kept.layers,
        "importance": {
            "layers": [round(value, 6) for value in importance.layers],
            "kept_channels_share": {
                layer: round(
                    float(importance.channels[layer][channels].sum() / importance.channels[layer].sum()), 4
                )
                for layer, channels in kept.channels.items()
            },
            "kept_groups": kept.groups,
        },
    }


REPORT_NAME = "prune_report.json"


def write_report(output_dir: str, report: dict) -> None:
    import json
    from pathlib import Path

    Path(output_dir, REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    original, pruned = report["models"]["original"], report["models"]["pruned"]
    logger.info(
        "Parameters %d -> %d (%.0f%%)%s",
        original["parameters"],
        pruned["parameters"],
        100 * pruned["parameter_share"],
        "".join(
            f"; {key} {original[key]:.3f} -> {pruned[key]:.3f}"
            for key in original
            if key.endswith("perplexity")
        ),
    )
