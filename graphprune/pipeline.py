"""Pass infrastructure: a pipeline is an explicit list of passes run by a manager."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import BadInputError, GraphpruneError, PassError

__all__ = ["Pass", "PassResult", "PruneContext", "PassManager", "Progress"]


@dataclass
class PassResult:
    """What a pass did: whether it changed the model, and anything it wants to report."""

    modified: bool = False
    info: dict = field(default_factory=dict)


class Pass:
    """One stage of the pipeline. Subclasses set `name` and implement `call(ctx)`.

    `requires`/`ensures` name context fields that must be set before/after the pass.
    """

    name: str = "pass"
    requires: tuple = ()
    ensures: tuple = ()

    def call(self, ctx: "PruneContext") -> PassResult:
        raise NotImplementedError

    def __call__(self, ctx: "PruneContext") -> PassResult:
        for attr in self.requires:
            if getattr(ctx, attr, None) is None:
                raise PassError(f"pass {self.name!r} needs {attr!r}, which no earlier pass produced")
        result = self.call(ctx)
        for attr in self.ensures:
            if getattr(ctx, attr, None) is None:
                raise PassError(f"pass {self.name!r} did not produce {attr!r}")
        return result or PassResult()

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


class Progress:
    """A tqdm bar when available and wanted, otherwise silent."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def bar(self, total: int, desc: str):
        if self.enabled and total > 0:
            try:
                from tqdm import tqdm

                return tqdm(total=total, desc=desc, leave=False, mininterval=1.0, delay=1.0)
            except ImportError:
                pass
        return _NullBar()


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class PruneContext:
    """Everything passes share: the model being compiled and the analysis results."""

    model: Any                      # graphprune.graph.Model being rewritten
    original: Any = None            # reference Model: the input, normalized (same function)
    input_model: Any = None         # the input exactly as loaded (for "before" costs)
    registry: Any = None            # OpRuleRegistry (a copy: user rules stay local)
    options: dict = field(default_factory=dict)
    dependency: Any = None          # DependencyGraph
    groups: list | None = None      # [ChannelGroup]
    scores: dict | None = None      # group id -> np.ndarray per channel
    plan: Any = None                # PrunePlan
    report: dict = field(default_factory=dict)
    protected: set = field(default_factory=set)   # group ids never pruned
    progress: Progress = field(default_factory=lambda: Progress(False))
    timings: dict = field(default_factory=dict)

    def option(self, key: str, default=None):
        return self.options.get(key, default)


class PassManager:
    """Runs passes in order; a failure names the pass and the passes before it."""

    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)

    def insert_after(self, name: str, new: Pass) -> None:
        self.passes.insert(self.index(name) + 1, new)

    def insert_before(self, name: str, new: Pass) -> None:
        self.passes.insert(self.index(name), new)

    def index(self, name: str) -> int:
        for i, p in enumerate(self.passes):
            if p.name == name:
                return i
        raise KeyError(f"no pass named {name!r} in {[p.name for p in self.passes]}")

    def run(self, ctx: PruneContext, *, log: Callable[[str], None] | None = None) -> PruneContext:
        done: list[str] = []
        bar = ctx.progress.bar(len(self.passes), "graphprune")
        for p in self.passes:
            bar.set_description(f"graphprune: {p.name}")
            t0 = time.perf_counter()
            try:
                result = p(ctx)
            except GraphpruneError:
                raise
            except MemoryError:
                raise BadInputError(f"out of memory in pass {p.name!r}: the model needs more memory than "
                                    f"this machine has free") from None
            except Exception as exc:
                raise PassError(
                    f"pass {p.name!r} failed after [{', '.join(done)}]: {type(exc).__name__}: {exc}"
                ) from exc
            ctx.timings[p.name] = time.perf_counter() - t0
            if result.info:
                ctx.report.setdefault("passes", {})[p.name] = result.info
            done.append(p.name)
            bar.update()
            if log:
                log(f"{p.name}: {ctx.timings[p.name]:.2f}s")
        bar.close()
        return ctx
