"""`prune` settings: importance estimation (stage 1) and trimming (stage 2).

Contract between the stages: `importance.safetensors` in the run dir holds float32
score tensors in GLOBAL order (as at TP=1/PP=1), larger = more important:

  attn.head            [num_layers, num_attention_heads]
  attn.group           [num_layers, num_query_groups]
  mlp.neuron           [num_layers, ffn_hidden_size]
  hidden.channel       [hidden_size]            the norms/combination of hidden_norms/hidden_combine
  hidden.channel_by_norm [2L+1, hidden_size]    per norm output: rows 2i layer i input norm,
                                                2i+1 its pre-MLP norm, 2L the final norm
  hidden.norm_moments  [2L+1, 2, hidden_size]   mean over tokens of z and z^2 (z: the norm's
                                                normalised input), for prune.norm_rescale
  depth.block_importance [num_layers]           1 - mean cos(layer input, output)
  depth.loss_drop      [num_layers]             val loss with layer i skipped minus baseline
  depth.contiguous     [num_layers - k + 1]     val loss increase removing layers i..i+k-1

and for a mixture-of-experts model (importance/moe.py; E experts of F neurons, S shared):

  moe.expert           [num_layers, E]          mean ||output|| over the tokens routed to it
  moe.expert_frequency [num_layers, E]          fraction of tokens routed to it
  moe.expert_neuron    [num_layers, E, F]       per expert, per neuron of its FFN
  moe.neuron           [num_layers, F]          per neuron, over every routed (token, expert)
  moe.shared_neuron    [num_layers, S]          per shared-expert neuron

and `importance.json` the metadata (model config, aggregation, tokens, rankings).
"""

from dataclasses import dataclass, field
from typing import List, Optional


DEPTH_METRICS = ("block_importance", "loss_drop", "contiguous")
"""Layer rankings importance can compute (`prune.importance.depth_metrics`) and trimming can
rank by (`prune.depth_metric`)."""

EXPERT_METRICS = {"output_norm": ("moe.expert",), "frequency": ("moe.expert_frequency",),
                  "contribution": ("moe.expert", "moe.expert_frequency")}
"""`prune.expert_metric` -> the scores that rank routed experts (contribution: their product, the
expert's mean output norm over every token, routed to it or not)."""


@dataclass
class ImportanceConfig:
    calibration_samples: int = 1024
    """Samples (of seq_length tokens) for the width statistics, split over DP ranks. The paper's
    count; on SmolLM2-135M 32-256 samples of 256 tokens kept 95-100% of the same units, and more
    did not lower the pruned loss (docs/real_model_defaults.md)."""
    micro_batch_size: int = 4
    batch_agg: str = "l2"
    """Aggregation over the batch: mean (of |x|), l2 or var. The paper's best: l2."""
    seq_agg: str = "mean"
    """Aggregation over the sequence, applied first: mean (of |x|), l2 or var. Best: mean. No other
    (batch, seq) pair was better at both width targets on SmolLM2-135M, nor after KD on the toy
    (docs/real_model_defaults.md)."""
    depth_metrics: Optional[List[str]] = field(default_factory=lambda: list(DEPTH_METRICS))
    """Which depth statistics to compute. block_importance comes free with the calibration
    pass; loss_drop and contiguous each cost extra validation passes. The commands' default
    (`PruneConfig.importance`) is None: what the target needs (see `recipes/prune.py`); a
    list set by the user is computed as given. This dataclass's own default (every metric)
    is what a library caller of `estimate_importance` gets."""
    hidden_norms: str = "all"
    """Which norm outputs score hidden channels: all (every norm, final included), layers (the
    2 x num_layers per-layer norms), input or pre_mlp (one kind of per-layer norm). Every
    norm's scores are stored (hidden.channel_by_norm), so `prune.stage=trim prune.scores=DIR`
    applies this setting without a new calibration pass."""
    hidden_combine: str = "sum"
    """How the chosen norms' score vectors combine: sum, or normalized (each divided by its own
    sum first, so no norm dominates by scale). all/sum: a tie with layers on the toy, the best of
    seven variants at 0.5x on SmolLM2-135M (docs/real_model_defaults.md)."""
    depth_samples: int = 64
    """Validation samples for the loss-based depth metrics."""
    contiguous_k: int = 2
    """Block length for the contiguous-block depth metric."""


@dataclass
class TrimTarget:
    """The pruned architecture: each field optional (None keeps the original)."""

    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    num_layers: Optional[int] = None
    drop_layers: Optional[List[int]] = None
    """Explicit 0-based layers to drop (instead of num_layers ranked by depth_metric)."""
    param_budget: Optional[float] = None
    """Fraction of the original parameters (e.g. 0.5), resolved to a width target (dense models):
    MLP neurons first, down to the hidden size, then hidden channels (trim/validate.py). On
    SmolLM2-135M at 0.5 this shape beat the recipe's search winner zero-shot and after the same
    short KD (docs/real_model_defaults.md)."""
    num_moe_experts: Optional[int] = None
    """Routed experts kept per MoE layer (the router keeps their rows)."""
    moe_ffn_hidden_size: Optional[int] = None
    """FFN width of every kept routed expert (each expert keeps its own most important neurons)."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Width of the shared expert."""


@dataclass
class PruneConfig:
    stage: str = "all"
    """all (importance then trim), importance (write scores and stop) or trim (reuse scores)."""
    method: str = "importance"
    """importance, random or magnitude (the latter two are ablation baselines)."""
    depth_metric: str = "block_importance"
    """block_importance, loss_drop or contiguous: ranks layers when num_layers is cut.
    block_importance costs no pass beyond calibration and kept the better SmolLM2-135M at 30 -> 19
    layers (zero-shot and after KD); at 30 -> 11, contiguous did (docs/real_model_defaults.md)."""
    norm_rescale: str = "auto"
    """auto, calibrated or none (true/false also accepted): when hidden channels are cut, multiply
    each kept norm weight by the calibration estimate of rms_kept / rms_full (LayerNorm: the std
    ratio, plus a bias shift for the mean), so that the norm's statistic over fewer channels
    does not rescale its output. See trim/hidden.py. auto (the default, chosen by measurement:
    docs/hidden_importance.md; on SmolLM2-135M it lowers the 0.5x model's loss by 0.46 zero-shot
    and 0.39 after 12 KD steps, docs/real_model_defaults.md) calibrates when the scores carry the
    norm moments and keeps the plain slice otherwise (random/magnitude baselines, older score
    files); calibrated requires the moments."""
    expert_metric: str = "contribution"
    """How routed experts are ranked when prune.target.num_moe_experts cuts them: contribution
    (moe.expert x moe.expert_frequency: the expert's output norm summed over every token, divided
    by the token count), output_norm (moe.expert, the mean over its routed tokens only) or
    frequency (moe.expert_frequency, how often the router picks it). The default was chosen by
    benchmarks/moe_expert_pruning.py (docs/moe.md): 8 -> 4 experts of a trained tiny-moe,
    contribution beat output_norm, frequency and random, zero-shot and after the same short KD."""
    memory_check: bool = True
    """On CUDA, refuse (before loading the model) a prune whose weights cannot fit the device: this
    rank's share of the source model, the pruned copy trim builds beside it, and one calibration
    micro batch's float32 logits (plan/guard.py refuse_prune_if_over)."""
    residual_heads: bool = False
    """Fold pruned query heads into kept ones (the paper's head_i + (head_i - head_2K-i+1))."""
    scores: Optional[str] = None
    """A run dir whose importance.safetensors to reuse (stage=trim)."""
    target: TrimTarget = field(default_factory=TrimTarget)
    importance: ImportanceConfig = field(default_factory=lambda: ImportanceConfig(depth_metrics=None))
    """`depth_metrics` None here: a command computes the depth metrics its target needs, so that
    None (the default) can be told from a list the user set."""
