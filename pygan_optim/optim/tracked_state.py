"""Optimizer state containers that count structural edits.

FusedAdam keeps each param group's tensors in a C++ plan between steps.
Checking every state entry each step would cost more than the update with
thousands of parameters, so the state instead counts its own edits: adding,
replacing or removing a parameter's state, or a tensor inside it (pruning,
resetting, loading) bumps ``version`` and the plans are rebuilt. In-place
changes to the tensors need no rebuild: the plan holds the same tensors.

A dict a user stores as a parameter's state (``state[p] = d``, or inside a
container assigned to ``optimizer.state``) cannot count its edits. The next
step reads it as it is then (filled in after it was stored, as torch would
read it), keeps the entries in a ParamState of its own (``adopt_given``) and,
once the step succeeded, puts the same tensors back into ``d``
(``mirror_given``), which later steps update in place: ``d`` keeps showing the
state, but an entry replaced in ``d`` after that step is not seen (torch, which
keeps ``d`` itself, would see it). Checking such dicts every step instead
would cost more than the update with thousands of them (``state[p] = {}`` is
a common way to reset a parameter's state).
"""
from __future__ import annotations

import weakref
from collections import defaultdict


def _edit(method_name):
    def edit(self, *args, **kwargs):
        result = getattr(super(type(self), self), method_name)(*args, **kwargs)
        root = self._root()
        if root is not None:  # None: a ParamState that outlived its optimizer's state
            root.version += 1
        return result
    edit.__name__ = method_name
    return edit


_EDITS = ("__setitem__", "__delitem__", "__ior__", "pop", "popitem", "clear", "update",
          "setdefault")


class ParamState(dict):
    """One parameter's state (step, exp_avg, ...): a dict that reports edits.
    It holds its OptimizerState weakly: no reference cycle keeps a deleted
    optimizer's tensors (and the parameters keying them) alive until Python's
    cycle collector runs, as torch's plain dicts keep nothing."""

    __slots__ = ("_owner",)

    def __init__(self, owner: "OptimizerState", *args):
        super().__init__(*args)
        self._owner = owner._weak_self

    def _root(self):
        return self._owner()

    def __reduce__(self):  # pickles and deep-copies as a plain dict
        return dict, (dict(self),)


class OptimizerState(defaultdict):
    """``optimizer.state``: param -> ParamState, counting edits in ``version``."""

    def __init__(self, items=(), given: bool = False):
        """`given`: the dicts in `items` are the user's (see the module docstring)."""
        self._weak_self = weakref.ref(self)
        # A factory holding self weakly: no cycle (see ParamState).
        super().__init__(_ParamStateFactory(self._weak_self))
        self.version = 0
        self._given = {}  # param -> a dict the user stored, until the next step
        for param, state in dict(items).items():
            # Hooks may store other values than a parameter's state dict.
            if isinstance(state, dict) and given:
                self._given[param] = state  # as stored: adopt_given copies it
            elif isinstance(state, dict):
                state = ParamState(self, state)
            dict.__setitem__(self, param, state)

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
        if isinstance(value, dict) and not (isinstance(value, ParamState)
                                            and value._owner is self._weak_self):
            self._given[key] = value
        else:
            self._given.pop(key, None)
        defaultdict.__setitem__(self, key, value)
        self.version += 1

    def adopt_given(self) -> list:
        """Replaces each dict the user stored since the last step, and still in
        place, by a ParamState with its entries as they are now. Returns
        [(param, the user's dict)] for mirror_given or restore_given."""
        if not self._given:
            return []
        adopted = []
        for key, given in self._given.items():
            if dict.get(self, key) is given:
                dict.__setitem__(self, key, ParamState(self, given))
                adopted.append((key, given))
        self._given.clear()
        self.version += 1
        return adopted

    def mirror_given(self, adopted: list) -> None:
        """After a step: the user's dicts hold the state's tensors."""
        for key, given in adopted:
            state = dict.get(self, key)
            if isinstance(state, ParamState):
                given.clear()
                given.update(state)

    def restore_given(self, adopted: list) -> None:
        """After a refused step: the user's dicts back in place, as they were."""
        for key, given in adopted:
            dict.__setitem__(self, key, given)
            self._given[key] = given
        if adopted:
            self.version += 1

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = ParamState(self) if default is None else default
        return dict.__getitem__(self, key)


class _ParamStateFactory:
    """OptimizerState's default factory: a new ParamState of the state it holds weakly."""

    __slots__ = ("owner",)

    def __init__(self, owner: weakref.ref):
        self.owner = owner

    def __call__(self) -> ParamState:
        return ParamState(self.owner())


for _name in _EDITS:
    setattr(ParamState, _name, _edit(_name))
    if _name not in OptimizerState.__dict__:  # the ones above convert values too
        setattr(OptimizerState, _name, _edit(_name))


def _plain_state(items):
    return defaultdict(dict, {k: dict(v) if isinstance(v, dict) else v for k, v in items.items()})
