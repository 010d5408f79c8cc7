"""Updates and models as ML code holds them: one vector for the round, the caller's shapes back.

    vector, layout = flatten([w1, b1, w2, b2])     # arrays of any shapes (Flower's NDArrays), tensors...
    weights = layout.unflatten(model)              # a list of arrays of the same shapes and float dtypes

Accepted: a numpy array of any shape; a list or tuple of arrays (or anything with ``__array__``,
such as a CPU tensor); any single object with ``__array__``.  A list of plain numbers is one
vector, as before.  Flattening is row-major (C order) and concatenates the parts in order, in
float64.  Unflattening restores each part's shape and its floating dtype (float16/32/64; other
dtypes come back as float64, since an aggregate is not an integer).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from .errors import ClientError


@dataclass(frozen=True)
class Layout:
    """Where each part of a flattened update lives: its shape and dtype, and the container kind
    (``"array"``: one array, ``"list"``/``"tuple"``: several)."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    kind: str = "list"

    @property
    def size(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    def unflatten(self, vector: np.ndarray) -> np.ndarray | list[np.ndarray] | tuple[np.ndarray, ...]:
        """``vector`` (``size`` values) cut back into the parts, shaped and typed as they were."""
        v = np.asarray(vector).ravel()
        if v.size != self.size:
            raise ClientError(f"a vector of {v.size} values cannot take the shapes {list(self.shapes)} ({self.size} values)")
        parts, at = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes):
            n = int(np.prod(shape, dtype=np.int64))
            parts.append(v[at:at + n].astype(dtype if dtype.kind == "f" else np.float64).reshape(shape))
            at += n
        if self.kind == "array":
            return parts[0]
        return tuple(parts) if self.kind == "tuple" else parts

    @classmethod
    def of(cls, like: object) -> Layout:
        """The layout of ``like``: a Layout, a sequence of shapes (tuples of ints), or example
        arrays in any form ``flatten`` takes (e.g. the model's initial weights)."""
        if isinstance(like, Layout):
            return like
        if isinstance(like, (list, tuple)) and like and all(_is_shape(s) for s in like):
            shapes = tuple(tuple(int(d) for d in s) for s in like)
            return cls(shapes, tuple(np.dtype(np.float64) for _ in shapes), "tuple" if isinstance(like, tuple) else "list")
        return flatten(like)[1]


def _is_shape(s: object) -> bool:
    return isinstance(s, tuple) and all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0 for d in s)


def _as_array(x: object, where: str) -> np.ndarray:
    try:
        a = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - a tensor that needs .detach().cpu(), a ragged list...
        raise ClientError(f"cannot read {where} ({type(x).__name__}) as an array: {exc}; pass CPU arrays "
                          "(for a tensor: t.detach().cpu().numpy())") from None
    if a.dtype.kind not in "biuf":
        raise ClientError(f"{where} has dtype {a.dtype}; an update must be real numbers")
    return a


def flatten(update: object) -> tuple[np.ndarray, Layout]:
    """One float64 vector of ``update``'s values and the layout to cut a vector back into its shapes."""
    if isinstance(update, (list, tuple)) and not all(isinstance(u, numbers.Number) for u in update):
        parts = [_as_array(u, f"update part {i}") for i, u in enumerate(update)]
        kind = "tuple" if isinstance(update, tuple) else "list"
    else:
        parts, kind = [_as_array(update, "the update")], "array"
    layout = Layout(tuple(p.shape for p in parts), tuple(p.dtype for p in parts), kind)
    vector = np.concatenate([p.astype(np.float64).ravel() for p in parts]) if parts else np.zeros(0)
    return vector, layout


def unflatten(vector: np.ndarray, like: object) -> np.ndarray | list[np.ndarray] | tuple[np.ndarray, ...]:
    """``vector`` in the shapes of ``like`` (a Layout, a sequence of shapes, or example arrays)."""
    return Layout.of(like).unflatten(vector)


__all__ = ["Layout", "flatten", "unflatten"]
