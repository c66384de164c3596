"""The public API: every exported name exists, and the documented names are exported."""

from __future__ import annotations

import netcl_optim as no

DOCUMENTED = {
    # netcl-optim-docs.txt
    "SGD", "Adam", "AdamW", "Momentum", "RMSProp", "CosineAnnealingLR", "ReduceLROnPlateau",
    "WarmupCosine", "clip_grad_norm", "clip_grad_norm_device", "AMPGradScaler",
    # the functional core (issue: optax names)
    "GradientTransformation", "chain", "named_chain", "identity", "apply_updates", "step",
    "scale", "scale_by_learning_rate", "scale_by_schedule", "trace", "scale_by_adam",
    "scale_by_rms", "add_decayed_weights", "clip", "clip_by_global_norm", "sgd", "momentum",
    "adam", "adamw", "rmsprop", "to_device", "to_host", "pack", "Parameter", "save", "load",
    "inject_hyperparams", "reduce_on_plateau", "masked", "partition", "multi_transform",
    "apply_if_finite", "zero_nans", "MultiSteps", "dynamic_loss_scale",
    # issue 14: reliability
    "CheckpointError",
    "DonatedArrayError",
    # issue 16: torch.nn.utils' clipping helpers, optax.global_norm
    "clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_",
    "global_norm",
    # issue 16: a value per leaf, row or unit; per-leaf state; measurements
    "SegmentReduction", "scale_by_trust_ratio", "scale_by_param_block_norm",
    "scale_by_param_block_rms", "clip_by_block_rms", "centralize", "normalize_by_update_norm",
    "adaptive_grad_clip", "lamb", "Lamb", "lars", "LARS", "fromage", "Fromage", "novograd",
    "NovoGrad", "scale_by_novograd", "monitor", "snapshot", "measure_with_ema", "leaf_norms",
    "update_param_ratio", "adafactor", "Adafactor", "scale_by_factored_rms", "FactoredState",
    "scale_by_adafactor_step", "sm3", "SM3", "scale_by_sm3", "ScaleBySM3State",
}  # fmt: skip


def test_every_exported_name_exists():
    missing = [n for n in no.__all__ if not hasattr(no, n)]
    assert not missing


def test_documented_names_are_exported():
    assert DOCUMENTED - set(no.__all__) == set()


def test_no_private_module_leaks_into_all():
    assert not [n for n in no.__all__ if n.startswith("_")]


def test_optimizer_classes_are_reachable_from_stateful():
    classes = [n for n in no.__all__ if isinstance(getattr(no, n), type)]
    optimizers = [n for n in classes if issubclass(getattr(no, n), no.Optimizer)]
    assert {"SGD", "Adam", "AdamW", "Momentum", "RMSProp", "RMSprop"} <= set(optimizers)
    assert all(getattr(no.stateful, n) is getattr(no, n) for n in optimizers)
    assert not hasattr(no.stateful, "chain")  # the facade offers optimizer classes only
