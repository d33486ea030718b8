"""Prune options: the one home of every option's default, allowed values and validation.

:class:`PruneOptions` is what ``graphprune.prune(model, **options)`` accepts, and the CLI's
prune and analyze argument groups are built from its field metadata (as Polygraphy builds its
argument groups over its API), so each option is defined once: a default (``round_to=8``), a
check (a ratio in (0, 1]), a list of choices (criteria from the criterion registry) is written
here and nowhere else. A misspelt option is an error naming the closest match.
"""
from __future__ import annotations

import argparse
import difflib
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

from .argtypes import int_at_least, number_in, parse_shapes
from .errors import BadInputError

__all__ = ["PruneOptions", "OptionSpec", "option", "check_ratio", "check_fraction", "add_option_arguments",
           "options_from_args", "option_defaults", "policy_from", "PRUNE", "ANALYZE"]

PRUNE, ANALYZE = "prune", "analyze"
WIDTH_FLAGS = ("gqa_uniform", "head_dim", "prune_hidden", "prune_kv_cache")  # policy switches


def check_ratio(v: float) -> str | None:
    """What is wrong with a fraction to keep (None when it is in (0, 1]); NaN is never in range."""
    return None if 0 < v <= 1 else f"{v} is outside (0, 1]: it is the fraction to keep"


def check_fraction(v: float) -> str | None:
    return None if 0 <= v <= 1 else f"{v} is outside [0, 1]"


def check_non_negative(v: float) -> str | None:
    return None if v >= 0 else f"{v} must be >= 0"


def _criterion_names() -> list[str]:
    from .passes.criteria import criterion_names  # the criterion registry (user criteria included)

    return criterion_names()


def _compensate_modes() -> tuple:
    from .passes.compensate import COMPENSATE_MODES

    return COMPENSATE_MODES


def _damp_selections() -> tuple:
    from .passes.compensate import DAMP_SELECT  # gcv, cv: the compensation pass owns how it chooses

    return DAMP_SELECT


@dataclass(frozen=True)
class OptionSpec:
    """How one option is checked and shown on the command line.

    kind: "ratio" (a float in (0, 1]), "fraction" ([0, 1]), "non_negative" (a float >= 0),
    "int>=N", "flag" (a bool), or None (any value). `choices` is a tuple or a callable that
    returns the allowed values (a registry). `commands` lists the CLI commands that show the
    option (none: Python API only); `group` is the argument group's title ("": ungrouped).
    """

    help: str = ""
    kind: str | None = None
    choices: Any = None
    metavar: str | None = None
    nargs: str | None = None
    action: str | None = None  # argparse action other than store / store_true (e.g. "append")
    commands: tuple = ()
    group: str = ""

    def allowed(self) -> tuple | None:
        c = self.choices() if callable(self.choices) else self.choices
        return None if c is None else tuple(c)

    def argparse_type(self) -> Callable | None:
        if self.kind in _FLOAT_CHECKS:
            return number_in(_FLOAT_CHECKS[self.kind])
        if self.kind and self.kind.startswith("int>="):
            return int_at_least(int(self.kind[5:]))
        if self.kind == "int":
            return int
        return None

    def check(self, name: str, value):
        """The value, checked and converted; a one-line BadInputError naming the option otherwise."""
        if value is None:
            return None
        if self.kind == "shapes":
            return parse_shapes(value) or None
        if self.kind in _FLOAT_CHECKS:
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise BadInputError(f"{name} must be a number, got {value!r}") from None
            problem = _FLOAT_CHECKS[self.kind](v)
            if problem:
                raise BadInputError(f"{name}: {problem}")
            return v
        if self.kind and self.kind.startswith("int"):
            try:
                v = int(value)
            except (TypeError, ValueError):
                raise BadInputError(f"{name} must be an integer, got {value!r}") from None
            lo = int(self.kind[5:]) if self.kind.startswith("int>=") else None
            if lo is not None and v < lo:
                raise BadInputError(f"{name} must be >= {lo}, got {v}")
            return v
        allowed = self.allowed()
        if allowed is not None and value not in allowed:
            raise BadInputError(f"unknown {name} {value!r} (choose from {', '.join(map(str, allowed))})")
        return value


def check_positive(v: float) -> str | None:
    return None if v > 0 and v != float("inf") else f"{v} must be > 0"


_FLOAT_CHECKS = {"ratio": check_ratio, "fraction": check_fraction, "non_negative": check_non_negative,
                 "positive": check_positive}

_CALIB = "accuracy without fine-tuning"
_DEPTH = "depth pruning (whole residual branches)"
_RECOVER = "recovery (distillation against the original, no labels)"


def _branch_criteria() -> list[str]:
    from .depth import branch_criterion_names  # the branch criterion registry (user criteria included)

    return branch_criterion_names()


def option(default, help: str = "", **spec):
    """A dataclass field with its OptionSpec in the metadata (how options dataclasses declare a field)."""
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"spec": OptionSpec(help=help, **spec)}, **kw)


@dataclass
class PruneOptions:
    """Every option of :func:`graphprune.prune` (the registry and pipeline objects aside)."""

    target_flops: float | None = option(
        None, "fraction of the original MACs to keep, in (0, 1]; the result lands in [R-0.02, R]",
        kind="ratio", metavar="R", commands=(PRUNE,))
    target_params: float | None = option(
        None, "fraction of the original parameters to keep", kind="ratio", metavar="R", commands=(PRUNE,))
    criterion: str = option(
        "l1", "channel importance criterion (default: {default}). Data-aware: wanda, flap, obs (use --calib); "
              "data-free: l1, l2, bn-scale, obs-free, random", choices=_criterion_names, commands=(PRUNE,))
    round_to: int = option(
        8, "keep pruned channel counts a multiple of N where the original was (default: {default})",
        kind="int>=1", metavar="N", commands=(PRUNE,))
    min_keep: float = option(
        0.1, "minimum fraction of channels each group keeps (default: {default})", kind="fraction", metavar="F",
        commands=(PRUNE,))
    protect: tuple = option(
        tuple, "node names (glob patterns allowed) whose channels are left untouched", nargs="+",
        metavar="NODE", commands=(PRUNE,))
    uniform: bool = option(False, "prune every group by the same ratio", kind="flag", commands=(PRUNE,))
    gqa_uniform: bool = option(
        False, "grouped-query attention: prune query heads evenly inside every KV group (default: a KV head and "
               "the query heads sharing it go together)", kind="flag", commands=(PRUNE, ANALYZE))
    head_dim: bool = option(
        False, "prune the head dimension, uniformly across heads (Q.K^T contraction included; rotary pairs go "
               "together) instead of whole heads", kind="flag", commands=(PRUNE, ANALYZE))
    prune_hidden: bool = option(
        False, "prune the hidden (residual stream) width too: one group through every residual add, "
               "LayerNorm/RMSNorm and embedding; normalisation statistics are taken over the kept channels "
               "(default: pinned)", kind="flag", commands=(PRUNE, ANALYZE))
    prune_kv_cache: bool = option(
        False, "decoders with past/present key-value graph inputs/outputs: allow head pruning, which changes the "
               "cache shapes (reported per input/output); pinned otherwise", kind="flag", commands=(PRUNE, ANALYZE))
    shape: Any = option(
        None, "input shape MACs are counted at, NAME:DxDx... per input (repeatable; prune takes it from its "
              "--shape option). Default: static dims as they are, batch 1, dynamic image axes 224, other dynamic "
              "axes (sequence) 128", kind="shapes", action="append", metavar="NAME:DxD...", commands=(ANALYZE,))
    seed: int = option(0, "seed for random criteria and synthetic inputs (default: {default})", kind="int>=0",
                     commands=(PRUNE,))
    calib: Any = option(
        None, "calibration data: .npz (one array per input, named like the inputs), .npy (one input) or a folder "
              "of images; samples on axis 0. Later samples are held out for fidelity", metavar="PATH",
        commands=(PRUNE,), group=_CALIB)
    calib_samples: int = option(
        128, "samples used for calibration (default: {default}); up to 64 following ones are held out",
        kind="int>=1", metavar="N", commands=(PRUNE,), group=_CALIB)
    calib_preprocess: Any = option(
        None, "image folder preprocessing: a preset (imagenet, inception, raw) and/or key=value: size=224 "
              "resize=256 mean=0.485,0.456,0.406 std=0.229,0.224,0.225 scale=0.00392 layout=nchw|nhwc "
              "(default: imagenet; size and layout from the model input)", nargs="+", metavar="SPEC",
        commands=(PRUNE,), group=_CALIB)
    calib_heldout: int | None = option(None, "held-out samples after the calibration ones", kind="int>=0")
    calib_batch_size: int = option(8, "calibration batch size", kind="int>=1")
    compensate: str = option(
        "none", "re-fit consumers of removed channels on calibration data: bias (FLAP: bias only) or obs "
                "(least-squares weights and bias, layer by layer); default: {default}", choices=_compensate_modes,
        commands=(PRUNE,), group=_CALIB)
    compensate_select: str = option(
        "gcv", "how --compensate obs chooses each layer's dampening: gcv (generalised cross-validation over rows, "
               "default) or cv (2-fold cross-validation over calibration batches; also may keep the weights and "
               "re-fit the bias only; safer when rows of one sample are correlated)", choices=_damp_selections,
        commands=(PRUNE,), group=_CALIB)
    compensate_residual: bool = option(
        False, "--compensate obs: a layer whose output goes straight into a residual Add is fitted so the sum "
               "matches the original (it also absorbs the error the skip path brings)", kind="flag",
        commands=(PRUNE,), group=_CALIB)
    compensate_damp: float | None = option(None, "fixed dampening instead of a cross-validated one",
                                         kind="non_negative")
    compensate_sequential: bool = option(True, "re-fit layer by layer on the already compensated model", kind="flag")
    compensate_resume: bool = option(True, "resume activation statistics between compensation waves", kind="flag")
    fidelity: bool | None = option(
        None, "report output fidelity on held-out samples (on by default with --calib/--compensate)", kind="flag",
        commands=(PRUNE,), group=_CALIB)
    recover: bool = option(
        False, "after pruning (and compensation), train the pruned graph's weights in PyTorch to reproduce the "
               "original's outputs on augmented calibration inputs; the held-out samples decide when to stop",
        kind="flag", commands=(PRUNE,), group=_RECOVER)
    recover_minutes: float = option(
        5.0, "--recover time budget in minutes (default: {default})", kind="positive", metavar="M",
        commands=(PRUNE,), group=_RECOVER)
    recover_steps: int | None = option(
        None, "--recover: train exactly N steps instead of a time budget", kind="int>=1", metavar="N",
        commands=(PRUNE,), group=_RECOVER)
    recover_batch: int = option(16, "--recover: samples per training step (default: {default})", kind="int>=1",
                                metavar="N", commands=(PRUNE,), group=_RECOVER)
    recover_lr: float = option(1e-4, "--recover: Adam learning rate, decayed to 0 over the budget "
                                     "(default: {default})", kind="positive", metavar="LR",
                               commands=(PRUNE,), group=_RECOVER)
    stats_memory: int | None = option(None, "bytes of Hessians held at once", kind="int>=1")
    verify: bool = option(False, "check the mask-equivalence oracle with onnxruntime (needs onnxruntime)",
                        kind="flag", commands=(PRUNE,))
    verify_inputs: Any = option(
        None, "run the --verify oracle on these inputs (a .npz with one array per graph input, by name, or a dict "
              "in the API) instead of synthetic ones; implies --verify", metavar="NPZ", commands=(PRUNE,))
    depth: bool = option(
        False, "depth pruning: whole residual branches (attention/MLP sub-layers, CNN residual blocks) are "
               "candidates alongside channels for the target; branches go first by importance per MAC while the "
               "cost stays >= R-0.02, width pruning takes the rest", kind="flag", commands=(PRUNE,), group=_DEPTH)
    drop_branches: int | None = option(
        None, "remove exactly N residual branches (the N least important; --protect keeps a branch), then "
              "width-prune to the target if one is given", kind="int>=0", metavar="N", commands=(PRUNE,),
        group=_DEPTH)
    branch_criterion: str = option(
        "cosine", "residual branch importance (default: {default}): cosine (1 - cos(x, x+f(x)) on --calib or "
                  "synthetic inputs), output-change, finercut (greedy one at a time), weight-norm (no run)",
        choices=_branch_criteria, commands=(PRUNE,), group=_DEPTH)
    max_depth_fraction: float = option(
        0.25, "--depth removes at most this fraction of the residual branches (default: {default}; FinerCut "
              "removes a quarter of the sub-layers)",
        kind="fraction", metavar="F", commands=(PRUNE,), group=_DEPTH)
    progress: bool = option(False, "progress bars on stderr", kind="flag")
    policy: dict | None = option(None, "analysis policy switches (head_dim, prune_hidden, ...)")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def spec(cls, name: str) -> OptionSpec:
        return _field(cls, name).metadata["spec"]

    @classmethod
    def default(cls, name: str):
        return _default(_field(cls, name))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "PruneOptions":
        """Validated options; an unknown name is a one-line error naming the closest known one."""
        known = cls.names()
        for name in kwargs:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
                raise BadInputError(f"unknown option {name!r}{hint}")
        opts = cls(**kwargs)
        opts.validate()
        return opts

    def validate(self) -> None:
        """Check and normalise every value in place (BadInputError, one line, on the first bad one)."""
        for f in fields(self):
            spec = f.metadata["spec"]
            value = getattr(self, f.name)
            if value is None and self.default(f.name) is not None:
                raise BadInputError(f"{f.name} must be given (default: {self.default(f.name)!r}), got None")
            if spec.kind == "flag":
                continue
            setattr(self, f.name, spec.check(f.name, value))
        self.protect = tuple(self.protect or ())

    def resolved_policy(self) -> dict:
        return policy_from(self.policy, **{k: getattr(self, k) for k in WIDTH_FLAGS})

    def context_options(self) -> dict:
        """What the passes read through ``PruneContext.option`` (targets, criterion, rounding, ...)."""
        policy = self.resolved_policy()
        fidelity = self.fidelity
        if fidelity is None:
            fidelity = self.calib is not None or self.compensate != "none" or bool(policy.get("prune_hidden"))
        out = dict(target_macs=self.target_flops, target_params=self.target_params, criterion=self.criterion,
                   round_to=self.round_to, min_keep=self.min_keep, protect=list(self.protect),
                   uniform=self.uniform, seed=self.seed, verify=self.verify or self.verify_inputs is not None,
                   verify_inputs=self.verify_inputs, policy=policy,
                   compensate=self.compensate, compensate_damp=self.compensate_damp,
                   compensate_select=self.compensate_select, compensate_residual=self.compensate_residual,
                   compensate_sequential=self.compensate_sequential, compensate_resume=self.compensate_resume,
                   fidelity=bool(fidelity), shape=self.shape, recover=self.recover,
                   recover_minutes=self.recover_minutes, recover_steps=self.recover_steps,
                   recover_batch=self.recover_batch, recover_lr=self.recover_lr)
        if self.stats_memory is not None:
            out["stats_memory"] = self.stats_memory
        return out


def _field(cls, name: str):
    return next(f for f in fields(cls) if f.name == name)


def _default(f):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def option_defaults(cls) -> dict:
    """{option: default} of an options dataclass."""
    return {f.name: _default(f) for f in fields(cls)}


def policy_from(policy: dict | None = None, **flags) -> dict:
    """The analysis policy: `policy` plus every width switch (gqa_uniform, head_dim, ...) that is on."""
    out = dict(policy or {})
    for key, on in flags.items():
        if on:
            out[key] = True
    return out


def add_option_arguments(parser: argparse.ArgumentParser, command: str, cls=PruneOptions, prefix: str = "") -> None:
    """Add every option of `cls` shown by `command` to `parser`, in argument groups by title.

    With `prefix` (e.g. "bench-") each flag is ``--{prefix}NAME`` and its dest ``{prefix}NAME`` with
    underscores, for parsers that already use a name."""
    groups: dict[str, Any] = {"": parser}
    for f in fields(cls):
        spec: OptionSpec = f.metadata["spec"]
        if command not in spec.commands:
            continue
        if spec.group not in groups:
            groups[spec.group] = parser.add_argument_group(spec.group)
        default = _default(f)
        flag = prefix + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": flag.replace("-", "_"), "help": spec.help.replace("{default}", str(default))}
        if spec.kind == "flag":
            kw.update(action="store_true", default=default)
        else:
            kw.update(default=list(default) if isinstance(default, tuple) else default)
            for key in ("metavar", "nargs", "action"):
                if getattr(spec, key) is not None:
                    kw[key] = getattr(spec, key)
            if spec.argparse_type() is not None:
                kw["type"] = spec.argparse_type()
            if spec.allowed() is not None:
                kw["choices"] = spec.allowed()
        groups[spec.group].add_argument("--" + flag, **kw)


def options_from_args(args: argparse.Namespace, command: str, cls=PruneOptions, prefix: str = "") -> dict:
    """{option: value} for the options `command` shows, read back from parsed arguments."""
    return {f.name: getattr(args, (prefix + f.name).replace("-", "_")) for f in fields(cls)
            if command in f.metadata["spec"].commands}
