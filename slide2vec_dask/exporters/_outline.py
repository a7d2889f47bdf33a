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
    p = np.pad(mask, 1)
    inner = p[1:-1, 1:-1]
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    # Boundary sides only (numpy finds them; the loop below runs over the perimeter, not the area),
    # directed with tissue on the right when walking y-down screen coordinates clockwise.
    sides = ((inner & ~p[:-2, 1:-1], (0, 0), (1, 0)),    # top: left to right
             (inner & ~p[1:-1, 2:], (1, 0), (1, 1)),     # right: downwards
             (inner & ~p[2:, 1:-1], (1, 1), (0, 1)),     # bottom: right to left
             (inner & ~p[1:-1, :-2], (0, 1), (0, 0)))    # left: upwards
    for where, (ax, ay), (bx, by) in sides:
        rows, cols = np.nonzero(where)
        for r, c in zip(rows.tolist(), cols.tolist()):
            edges.setdefault((c + ax, r + ay), []).append((c + bx, r + by))
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
    # Each ring bounds one 4-connected piece of tissue: the cell on the right of its first edge says which.
    from scipy import ndimage

    labels, _ = ndimage.label(mask)
    polygons: dict[int, list] = {}
    holes: list[tuple[int, list]] = []
    for ring in rings:
        piece = int(labels[_right_cell(ring)])
        if _area(ring) > 0:
            polygons[piece] = [ring]
        else:
            holes.append((piece, ring))
    for piece, ring in holes:
        polygons[piece].append(ring)
    return [polygons[k] for k in sorted(polygons)]   # label order: row-major by first cell


def _right_cell(ring) -> tuple[int, int]:
    """(row, col) of the tissue cell on the right of the ring's first edge."""
    (x0, y0), (x1, y1) = ring[0], ring[1]
    dx, dy = np.sign(x1 - x0), np.sign(y1 - y0)
    return int(np.floor(y0 + dy * 0.5 + dx * 0.5)), int(np.floor(x0 + dx * 0.5 - dy * 0.5))


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
