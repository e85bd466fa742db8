"""Layer lists kept stacked: runs of identical layers as one array per leaf.

A network's params are a list of layer dicts (one entry per weight layer, in order of
application). A deep uniform stack (98 hidden layers of one shape) as that list costs the
compiler once per layer wherever a program touches every layer: the training step's gradient,
optimizer update and parameter check become ~L small kernels each, and a model that runs the
stack as one `lax.scan` must stack the list and unstack its gradient at every step. A
`LayerList` holds the same layers as *segments*, each a layer dict whose leaves carry a leading
axis of the segment's length, so the step touches one array per leaf however deep the stack.

It behaves as the list it stands for where a model reads it: `len` is the number of layers,
`p[k]` is layer k's dict (one slice per leaf), `p[i:j]` a `LayerList` of those layers (one
slice per leaf of each segment it cuts), iteration yields the layers. It is a pytree whose
children are the segments, so `jax.tree.map`, optax, `jax.grad` and `vmap` see one leaf per
(segment, leaf) and keep the layout. `pack` builds one from a list, `unpack` gives the list
back (the same arrays: `unpack(pack(p))` equals `p` exactly), `per_layer` evaluates a
per-layer function as one vmapped call per segment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# consecutive layers of equal structure, shapes and dtypes are stacked from this many on
MIN_RUN = 2


@jax.tree_util.register_pytree_node_class
class LayerList:
    """Layers as segments: `segments[s]` is a layer dict whose leaves have a leading axis of
    length `counts[s]` (the segment's layers, in order). See the module's docstring."""

    __slots__ = ("segments", "counts")

    def __init__(self, segments: Sequence[Any], counts: Sequence[int]):
        if len(segments) != len(counts):
            raise ValueError(f"LayerList: {len(segments)} segments for {len(counts)} counts")
        self.segments = tuple(segments)
        self.counts = tuple(int(n) for n in counts)

    # -- pytree
    def tree_flatten(self):
        return self.segments, self.counts

    @classmethod
    def tree_unflatten(cls, counts, segments):
        return cls(segments, counts)

    # -- the list it stands for
    def __len__(self) -> int:
        return sum(self.counts)

    def _locate(self, k: int) -> tuple[int, int]:
        n = len(self)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"layer {k} of {n}")
        for s, c in enumerate(self.counts):
            if k < c:
                return s, k
            k -= c
        raise IndexError(k)  # unreachable

    def __getitem__(self, k):
        if isinstance(k, slice):
            start, stop, step = k.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return self._range(start, max(start, stop))
        s, i = self._locate(int(k))
        return jax.tree.map(lambda a: a[i], self.segments[s])

    def _range(self, start: int, stop: int) -> LayerList:
        segs, counts, off = [], [], 0
        for seg, c in zip(self.segments, self.counts, strict=True):
            a, b = max(start - off, 0), min(stop - off, c)
            if a < b:
                segs.append(
                    seg if (a, b) == (0, c) else jax.tree.map(lambda x, a=a, b=b: x[a:b], seg)
                )
                counts.append(b - a)
            off += c
        return LayerList(segs, counts)

    def __iter__(self):
        for k in range(len(self)):
            yield self[k]

    def __repr__(self) -> str:
        return f"LayerList(counts={self.counts})"

    def runs(self):
        """(stacked layer dict, count) per segment."""
        return zip(self.segments, self.counts, strict=True)


def _signature(p) -> tuple:
    leaves, treedef = jax.tree.flatten(p)
    return treedef, tuple((jnp.shape(a), jnp.result_type(a)) for a in leaves)


def pack(params: Sequence[dict], min_run: int = MIN_RUN) -> LayerList:
    """The layers of `params` (a list of layer dicts) as a `LayerList`: each run of at least
    `min_run` consecutive layers of equal structure, shapes and dtypes one stacked segment, every
    other layer a segment of one."""
    if isinstance(params, LayerList):
        return params
    params = list(params)
    segs, counts = [], []
    i = 0
    while i < len(params):
        j = i + 1
        sig = _signature(params[i])
        while j < len(params) and _signature(params[j]) == sig:
            j += 1
        if j - i < min_run:
            j = i + 1
        layers = params[i:j]
        segs.append(jax.tree.map(lambda *xs: jnp.stack(xs), *layers))
        counts.append(j - i)
        i = j
    return LayerList(segs, counts)


def unpack(params) -> list:
    """The list of layer dicts a `LayerList` stands for (a list is returned as it is)."""
    if isinstance(params, LayerList):
        return list(params)
    return params


def is_layer_list(x) -> bool:
    return isinstance(x, LayerList)


def unpack_tree(tree):
    """`tree` with every `LayerList` in it replaced by its list of layers."""
    return jax.tree.map(
        lambda x: unpack(x) if isinstance(x, LayerList) else x, tree, is_leaf=is_layer_list
    )


def pack_tree(template, tree):
    """`tree` (lists of layers where `template` holds `LayerList`s, the same structure
    elsewhere) packed in the template's layouts."""

    def one(t, x):
        if isinstance(t, LayerList):
            return like(t, x)
        return x

    return jax.tree.map(one, template, tree, is_leaf=is_layer_list)


def like(template: LayerList, layers: Sequence) -> LayerList:
    """`layers` (one entry per layer, each of a layer's structure) in `template`'s layout."""
    layers = list(layers)
    if len(layers) != len(template):
        raise ValueError(f"{len(layers)} layers for a layout of {len(template)}")
    segs, off = [], 0
    for c in template.counts:
        part = layers[off : off + c]
        segs.append(jax.tree.map(lambda *xs: jnp.stack(xs), *part))
        off += c
    return LayerList(segs, template.counts)


def like_factors(template: LayerList, factors: Sequence[dict]) -> LayerList:
    """Per-layer factors (one dict per layer, each factor broadcasting against its leaf: a
    scalar or an (out, 1, ...) array) in `template`'s layout, each stacked factor broadcasting
    against its stacked leaf."""
    factors = list(factors)
    segs, off = [], 0
    for seg, c in template.runs():
        part = factors[off : off + c]

        def stack(leaf, *fs):
            nd = leaf.ndim - 1  # a layer's leaf
            fs = [jnp.reshape(f, (1,) * (nd - jnp.ndim(f)) + jnp.shape(f)) for f in fs]
            shape = jnp.broadcast_shapes(*(f.shape for f in fs))
            return jnp.stack([jnp.broadcast_to(f, shape) for f in fs])

        segs.append(jax.tree.map(stack, seg, *part))
        off += c
    return LayerList(segs, template.counts)


def per_layer(fn: Callable, *trees) -> jax.Array:
    """(L,) values fn(layer_k of each tree): a list's layers one by one, a `LayerList`'s
    segments each one vmapped call (the trees share one layout)."""
    if not any(isinstance(t, LayerList) for t in trees):
        return jnp.stack([fn(*layers) for layers in zip(*trees, strict=True)])
    if not all(isinstance(t, LayerList) and t.counts == trees[0].counts for t in trees):
        trees = tuple(unpack(t) for t in trees)
        return jnp.stack([fn(*layers) for layers in zip(*trees, strict=True)])
    parts = []
    for segs in zip(*(t.segments for t in trees), strict=True):
        parts.append(jnp.reshape(jax.vmap(fn)(*segs), (-1,)))
    return jnp.concatenate(parts)
