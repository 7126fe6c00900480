"""midas_jax: pre-train language models with MIDAS (middle-layer gradual stacking) in JAX/Flax.

The top level needs only jax, flax and numpy (no gin, seqio or tensorflow):

    from midas_jax import grow_params
    bigger = grow_params(params, k=4)               # duplicate the middle block of 4 layers
"""

from midas_jax.growth import grow_opt_state, grow_params, layer_sources, tree_depth
from midas_jax.model import Decoder, ModelConfig, init_params, train_flops_per_token
from midas_jax.schedule import (Stage, baseline_schedule, prop_schedule, schedule_speedup,
                                theoretical_speedup)

__all__ = ["grow_params", "grow_opt_state", "layer_sources", "tree_depth", "Decoder",
           "ModelConfig", "init_params", "train_flops_per_token", "Stage", "prop_schedule",
           "baseline_schedule", "schedule_speedup", "theoretical_speedup"]
__version__ = "0.1.0"
