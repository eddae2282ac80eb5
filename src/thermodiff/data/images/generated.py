"""Generated images: dead leaves (opaque discs dropped one behind another)."""

import math

import numpy as np

from thermodiff.errors import UserError


def _power_law_radii(u: np.ndarray, r_min: float, r_max: float, exponent: float) -> np.ndarray:
    """Inverse CDF of the density proportional to r^-exponent on [r_min, r_max]."""
    if abs(exponent - 1) < 1e-12:
        return r_min * (r_max / r_min) ** u
    a = 1 - exponent
    lo, hi = r_min ** a, r_max ** a
    return (lo + u * (hi - lo)) ** (1 / a)


def dead_leaves(n: int, size: int = 64, seed: int = 0, r_min: float = 1.0, r_max: float | None = None,
                exponent: float = 3.0, max_discs: int = 100_000, return_info: bool = False):
    """Dead-leaves images (Lee, Mumford & Huang 2001; the data of Theis et al. 2012 that the paper
    used are not available, so these are generated): opaque discs dropped one after another,
    each new disc landing *behind* those already there, until every pixel is covered.

    - radius r has density proportional to r^-``exponent`` on [``r_min``, ``r_max``] pixels
      (defaults 3, 1 and size / 2: the scale-invariant choice of Lee et al.);
    - centres are uniform over the plane: concretely a disc of radius r has its centre uniform in
      the square [-r, size + r]^2 and is kept with probability ((size + 2r) / (size + 2 r_max))^2,
      which is the Poisson process of discs restricted to those that can touch the image (so the
      radii of discs whose centre lies inside the image follow the r^-exponent law exactly);
    - each disc has one grey level, uniform in [0, 1) and quantised to 8 bits: floor(256 u);
    - a pixel (i, j) is covered when its centre (i + 0.5, j + 0.5) lies within distance r.

    Image i depends only on (seed, i) and the parameters. At most ``max_discs`` discs are drawn
    per image; pixels still uncovered then take one more uniform grey level (a background
    behind every disc). Returns uint8 (n, 1, size, size), and with ``return_info`` also a dict:
    ``radius``, ``center`` (row, column), ``grey`` and ``image`` of every disc drawn, front to
    back, and ``n_discs`` and ``uncovered`` (pixels given the background) per image."""
    if n < 1 or size < 1:
        raise UserError(f"dead_leaves needs n >= 1 and size >= 1, got n={n}, size={size}")
    r_max = size / 2 if r_max is None else float(r_max)
    if not (0 < r_min < r_max and math.isfinite(r_max)) or not math.isfinite(exponent) or max_discs < 1:
        raise UserError(f"dead_leaves needs 0 < r_min < r_max and max_discs >= 1, got r_min={r_min}, r_max={r_max}, "
                        f"max_discs={max_discs}")
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]
    window = size + 2 * r_max
    # proposals per round: about 4 expected layers over each pixel
    mean_r2 = float(np.mean(_power_law_radii((np.arange(4096) + 0.5) / 4096, r_min, r_max, exponent) ** 2))
    per_round = max(16, int(math.ceil(4.0 * window ** 2 / (math.pi * mean_r2))))
    images = np.empty((n, 1, size, size), np.uint8)
    info = {"radius": [], "center": [], "image": [], "grey": [],
            "n_discs": np.zeros(n, np.int64), "uncovered": np.zeros(n, np.int64)}
    chunk = max(1, min(n, 2_000_000 // (per_round * 8)))
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk))
        canvas, drawn = _render_dead_leaves(idx, rngs, size, r_min, r_max, exponent, per_round, max_discs, window, info,
                                            return_info)
        images[idx, 0] = canvas
        info["n_discs"][idx] = drawn
    if not return_info:
        return images
    for key in ("radius", "image", "grey"):
        info[key] = np.concatenate(info[key])
    info["center"] = np.concatenate(info["center"])
    info.update(r_min=r_min, r_max=r_max, exponent=exponent, size=size)
    return images, info


def _render_dead_leaves(idx, rngs, size, r_min, r_max, exponent, per_round, max_discs, window, info, keep_discs):
    m, s2 = len(idx), size * size
    canvas = np.zeros(m * s2, np.uint8)
    covered = np.zeros(m * s2, bool)
    drawn = np.zeros(m, np.int64)
    active = np.ones(m, bool)
    while active.any():
        cols = {k: [] for k in ("img", "cx", "cy", "r", "grey")}
        for k in np.nonzero(active)[0]:
            u = rngs[idx[k]].random((5, per_round))
            r = _power_law_radii(u[0], r_min, r_max, exponent)
            keep = u[1] < ((size + 2 * r) / window) ** 2
            keep &= np.cumsum(keep) <= max_discs - drawn[k]
            r = r[keep]
            cx = -r + u[2, keep] * (size + 2 * r)
            cy = -r + u[3, keep] * (size + 2 * r)
            grey = np.minimum(np.floor(u[4, keep] * 256), 255).astype(np.uint8)
            drawn[k] += len(r)
            for key, v in zip(cols, (np.full(len(r), k), cx, cy, r, grey)):
                cols[key].append(v)
            if keep_discs:
                info["radius"].append(r)
                info["center"].append(np.stack([cx, cy], 1))
                info["image"].append(np.full(len(r), idx[k]))
                info["grey"].append(grey)
        img, cx, cy, r, grey = (np.concatenate(cols[k]) for k in cols)
        _paint_behind(canvas, covered, img, cx, cy, r, grey, size)
        left = (~covered).reshape(m, s2).any(1)
        for k in np.nonzero(active & left & (drawn >= max_discs))[0]:  # give up: a background behind all discs
            hole = ~covered[k * s2:(k + 1) * s2]
            info["uncovered"][idx[k]] = int(hole.sum())
            canvas[k * s2:(k + 1) * s2][hole] = min(int(rngs[idx[k]].random() * 256), 255)
            covered[k * s2:(k + 1) * s2] = True
        active &= left & (drawn < max_discs)
    return canvas.reshape(m, size, size), drawn


def _paint_behind(canvas, covered, img, cx, cy, r, grey, size):
    """Paint the discs (in order: earlier ones in front) onto the pixels not yet covered."""
    s2 = size * size
    m = len(covered) // s2
    # discs whose bounding box holds no uncovered pixel change nothing: drop them (summed-area table)
    free = np.zeros((m, size + 1, size + 1), np.int64)
    free[:, 1:, 1:] = (~covered).reshape(m, size, size).cumsum(1).cumsum(2)
    half = np.ceil(r).astype(np.int64)
    ci, cj = np.floor(cx).astype(np.int64), np.floor(cy).astype(np.int64)
    r0, r1 = np.clip(ci - half, 0, size), np.clip(ci + half + 1, 0, size)
    c0, c1 = np.clip(cj - half, 0, size), np.clip(cj + half + 1, 0, size)
    n_free = free[img, r1, c1] - free[img, r0, c1] - free[img, r1, c0] + free[img, r0, c0]
    order = np.nonzero(n_free > 0)[0]
    best = np.full(len(covered), np.iinfo(np.int64).max, np.int64)
    for h in np.unique(half[order]):
        sel_all = order[half[order] == h]
        off = np.arange(-h, h + 1)
        step = max(1, 4_000_000 // len(off) ** 2)
        for b in range(0, len(sel_all), step):
            sel = sel_all[b:b + step]
            ii = ci[sel, None, None] + off[None, :, None]
            jj = cj[sel, None, None] + off[None, None, :]
            dx, dy = ii + 0.5 - cx[sel, None, None], jj + 0.5 - cy[sel, None, None]
            inside = (dx * dx + dy * dy <= (r[sel] ** 2)[:, None, None]) \
                & (ii >= 0) & (ii < size) & (jj >= 0) & (jj < size)
            pix = (img[sel, None, None] * s2 + ii * size + jj)[inside]
            disc = np.broadcast_to(sel[:, None, None], inside.shape)[inside]
            free_hit = ~covered[pix]
            np.minimum.at(best, pix[free_hit], disc[free_hit])
    hit = best < np.iinfo(np.int64).max
    canvas[hit] = grey[best[hit]]
    covered |= hit
