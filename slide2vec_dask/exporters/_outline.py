"""Outlines of the true cells of a boolean grid, as polygons with holes (grid units).

Why here: the store keeps each grid tile's tissue fraction, not the mask itself, so
the tissue an export can draw is the set of grid cells holding any tissue; its
outline is traced exactly (no image library, no approximation).
"""

from __future__ import annotations

import numpy as np


def outline(mask: np.ndarray) -> list[list[list[tuple[int, int]]]]:
    """Polygons ``[outer ring, hole, ...]`` of ``mask`` (rows, cols); vertices are (col, row) corners.

    Rings are closed (first vertex repeated), outer rings clockwise on screen (y down),
    holes the other way; cells that touch only at a corner are separate polygons.
    """
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1)
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(a, b):
        edges.setdefault(a, []).append(b)

    rows, cols = np.nonzero(mask)
    for r, c in zip(rows.tolist(), cols.tolist()):
        p = padded[r + 1 - 1 : r + 1 + 2, c + 1 - 1 : c + 1 + 2]
        # tissue on the right of each directed edge, walking y-down screen coordinates clockwise
        if not p[0, 1]:
            add((c, r), (c + 1, r))            # top, left to right
        if not p[1, 2]:
            add((c + 1, r), (c + 1, r + 1))    # right, downwards
        if not p[2, 1]:
            add((c + 1, r + 1), (c, r + 1))    # bottom, right to left
        if not p[1, 0]:
            add((c, r + 1), (c, r))            # left, upwards
    rings = []
    while edges:
        start = next(iter(edges))
        ring, prev, here = [start], None, start
        while True:
            outs = edges[here]
            nxt = outs[0] if len(outs) == 1 or prev is None else _turn(prev, here, outs)
            outs.remove(nxt)
            if not outs:
                del edges[here]
            prev, here = here, nxt
            ring.append(here)
            if here == start:
                break
        rings.extend(_simplify(r) for r in _split(ring))
    outers = sorted((r for r in rings if _area(r) > 0), key=_area)   # smallest first: the innermost wins
    polygons = {id(o): [o] for o in outers}
    for hole in (r for r in rings if _area(r) < 0):
        probe = _probe(hole)
        owner = next((o for o in outers if _inside(probe, o)), None)
        if owner is not None:
            polygons[id(owner)].append(hole)
    return [polygons[id(o)] for o in sorted(outers, key=lambda r: (min(p[1] for p in r), min(p[0] for p in r)))]


def _split(ring):
    """A ring that passes a vertex twice (a hole touching its outline at a corner) as simple rings."""
    seen: dict = {}
    for i, p in enumerate(ring[:-1]):
        if p in seen:
            j = seen[p]
            return _split(ring[j : i + 1]) + _split(ring[:j] + ring[i:])
        seen[p] = i
    return [ring]


def _turn(prev, here, outs):
    """At a vertex two cells share only diagonally: keep the ring around one cell (turn right)."""
    dx, dy = here[0] - prev[0], here[1] - prev[1]
    right = (here[0] - dy, here[1] + dx)   # y-down: turning right of (dx, dy) is (-dy, dx)
    return right if right in outs else outs[0]


def _simplify(ring):
    out = [ring[0]]
    for i in range(1, len(ring) - 1):
        a, b, c = out[-1], ring[i], ring[i + 1]
        if (b[0] - a[0]) * (c[1] - b[1]) != (b[1] - a[1]) * (c[0] - b[0]):
            out.append(b)
    out.append(ring[-1])
    if len(out) > 3:   # the start may sit in the middle of a straight side
        a, b, c = out[-2], out[0], out[1]
        if (b[0] - a[0]) * (c[1] - b[1]) == (b[1] - a[1]) * (c[0] - b[0]):
            out = out[1:-1] + [out[1]]
    return out


def _area(ring) -> float:
    """Shoelace area; positive for clockwise rings on a y-down screen."""
    x = np.array([p[0] for p in ring], dtype=float)
    y = np.array([p[1] for p in ring], dtype=float)
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def _probe(ring):
    """A point in the empty cell beside a hole's first edge (tissue is on the edge's right)."""
    (x0, y0), (x1, y1) = ring[0], ring[1]
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    dx, dy = np.sign(x1 - x0), np.sign(y1 - y0)
    return mx + 0.5 * dy, my - 0.5 * dx


def _inside(pt, ring) -> bool:
    x, y = pt
    inside = False
    for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]):
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside
