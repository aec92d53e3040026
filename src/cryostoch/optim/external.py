"""Any `torch.optim.Optimizer` subclass, named by import path (``package.module:Class``), run
by the engine like the built-in methods: its closure calls counted as gradient evaluations,
and with ``lr=None`` its learning rate set to 1 / L from the curvature at the first step and at
every recalibration (a new cutoff or temperature), as for ``sgd``. This lets a methods
developer compare a new optimiser with the paper's seven on the same objective.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from cryostoch.optim.base import Closure, CountingOptimizer, check_lr


def is_import_path(name: str) -> bool:
    """``package.module:Class`` (a colon between a module and an attribute)."""
    module, _, attribute = str(name).partition(":")
    return bool(module) and bool(attribute)


def load_optimizer_class(path: str) -> type[torch.optim.Optimizer]:
    """The class at ``package.module:Class``; ValueError (one line) if it cannot be imported
    or is not a torch optimiser."""
    module_name, _, attribute = str(path).partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import optimiser {path!r}: {err}") from None
    if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
        raise ValueError(f"{path!r} is not a torch.optim.Optimizer subclass")
    return found


class ExternalOptimizer(CountingOptimizer):
    """Wraps ``optimizer_class(params, lr=..., **options)``, built at the first step (when the
    learning rate is known); its state is saved and restored with this one's."""

    single_group = True

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 lr: float | None = None, *, optimizer_class: type[torch.optim.Optimizer],
                 **options: Any) -> None:
        super().__init__(params, {"lr": check_lr(lr)})
        self.optimizer_class = optimizer_class
        self.options = options
        self._inner: torch.optim.Optimizer | None = None

    def _make_inner(self, lr: float) -> torch.optim.Optimizer:
        try:
            return self.optimizer_class(self._params(), lr=lr, **self.options)
        except TypeError as err:
            raise ValueError(f"cannot build {self.optimizer_class.__name__}: {err}") from None

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor | None:
        counted = self._require_closure(self._begin(closure), "the wrapped optimiser is "
                                                              "given the objective's closure")
        loss = None
        if self.param_groups[0]["lr"] is None:  # gradient and curvature at this point
            loss = self._evaluate(counted)
            self._ensure_lr(counted)
        lr = float(self.param_groups[0]["lr"])
        if self._inner is None:
            self._inner = self._make_inner(lr)
        for group in self._inner.param_groups:
            group["lr"] = lr
        stepped = self._inner.step(counted)
        self._end()
        return stepped if stepped is not None else loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["wrapped"] = None if self._inner is None else self._inner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        wrapped = state_dict.pop("wrapped", None)
        super().load_state_dict(state_dict)
        if wrapped is not None:
            self._inner = self._make_inner(float(self.param_groups[0]["lr"] or 1.0))
            self._inner.load_state_dict(wrapped)


__all__ = ["ExternalOptimizer", "is_import_path", "load_optimizer_class"]
