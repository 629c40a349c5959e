"""Optimizer state containers that count structural edits.

FusedAdam keeps each param group's tensors in a C++ plan between steps.
Checking every state entry each step would cost more than the update with
thousands of parameters, so the state instead counts its own edits: adding,
replacing or removing a parameter's state, or a tensor inside it (pruning,
resetting, loading) bumps ``version`` and the plans are rebuilt. In-place
changes to the tensors need no rebuild: the plan holds the same tensors.

A dict a user stores as a parameter's state (``state[p] = d``) stays that
object, as in torch, so later edits of ``d`` reach the optimizer; such dicts
cannot count their edits, so ``foreign_unchanged`` compares their entries
with the ones the plans were built from.
"""
from __future__ import annotations

from collections import defaultdict


def _edit(method_name):
    def edit(self, *args, **kwargs):
        result = getattr(super(type(self), self), method_name)(*args, **kwargs)
        self._root().version += 1
        return result
    edit.__name__ = method_name
    return edit


_EDITS = ("__setitem__", "__delitem__", "__ior__", "pop", "popitem", "clear", "update",
          "setdefault")


class ParamState(dict):
    """One parameter's state (step, exp_avg, ...): a dict that reports edits."""

    __slots__ = ("_owner",)

    def __init__(self, owner: "OptimizerState", *args):
        super().__init__(*args)
        self._owner = owner

    def _root(self):
        return self._owner

    def __reduce__(self):  # pickles and deep-copies as a plain dict
        return dict, (dict(self),)


class OptimizerState(defaultdict):
    """``optimizer.state``: param -> ParamState, counting edits in ``version``."""

    def __init__(self, items=()):
        super().__init__(self._new)
        self.version = 0
        self._foreign = {}  # param -> its state dict, stored as the user gave it
        for param, state in dict(items).items():
            # Hooks may store other values than a parameter's state dict.
            dict.__setitem__(self, param, ParamState(self, state) if isinstance(state, dict)
                             else state)

    def _new(self) -> ParamState:
        return ParamState(self)

    def _root(self):
        return self

    def __reduce__(self):  # pickles and deep-copies as torch's defaultdict(dict)
        return _plain_state, (dict(self),)

    # Copies are torch's state type, a defaultdict(dict), holding the same
    # per-parameter dicts (shallow, as torch's copies).
    def copy(self) -> defaultdict:
        return defaultdict(dict, self)

    __copy__ = copy

    def __or__(self, other):
        if not isinstance(other, dict):
            return NotImplemented
        out = self.copy()
        out.update(other)
        return out

    def __ror__(self, other):
        if not isinstance(other, dict):
            return NotImplemented
        out = defaultdict(dict, other)
        out.update(self)
        return out

    def __setitem__(self, key, value):
        if isinstance(value, dict) and not (isinstance(value, ParamState) and value._owner is self):
            self._foreign[key] = value
        else:
            self._foreign.pop(key, None)
        defaultdict.__setitem__(self, key, value)
        self.version += 1

    def is_foreign(self, key) -> bool:
        """Whether key's state is a dict the user stored."""
        value = self._foreign.get(key)
        return value is not None and dict.get(self, key) is value

    def foreign_entries(self) -> tuple:
        """The user-stored dicts still in place, with their current entries."""
        if not self._foreign:
            return ()
        for key, value in list(self._foreign.items()):
            if dict.get(self, key) is not value:  # removed or replaced since
                del self._foreign[key]
        return tuple((value, tuple(value.items())) for value in self._foreign.values())

    def foreign_unchanged(self, entries: tuple) -> bool:
        """Whether the user-stored dicts hold the same objects as `entries`
        (from foreign_entries) did."""
        now = self.foreign_entries()
        return len(now) == len(entries) and all(
            a is b and len(x) == len(y) and all(k == l and v is w for (k, v), (l, w) in zip(x, y))
            for (a, x), (b, y) in zip(now, entries))

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = self._new() if default is None else default
        return dict.__getitem__(self, key)


for _name in _EDITS:
    setattr(ParamState, _name, _edit(_name))
    if _name not in OptimizerState.__dict__:  # the ones above convert values too
        setattr(OptimizerState, _name, _edit(_name))


def _plain_state(items):
    return defaultdict(dict, {k: dict(v) if isinstance(v, dict) else v for k, v in items.items()})
