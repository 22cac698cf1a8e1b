"""A cost model built from a GPU profile: each step's time as the real engine on that card spends it.

    step   = host(num_seqs, prefill_tokens) + runner(batch) + block moves
    host   = the engine's own time around the runner: scheduling, update, outputs (the engine is synchronous, so the
             GPU idles meanwhile); piecewise linear in the batch's sequences plus a term per prefill token, fitted to
             the steps of a real run
    runner = ModelRunner.execute as one call: batch preparation, upload, forward, logits and sampling
    moves  = swap-out, swap-in and copy-on-write copies: a fixed cost and one per block, each

A decode-only batch replays the CUDA graph of the smallest bucket that holds it (without graphs: runs eagerly at
its own size), so its runner time is that bucket's measured curve over the total context, piecewise linear between
the profiled contexts, plus a small term for each padded row. Any other batch runs eagerly: a piecewise-linear
function of its tokens, plus the prefill kernel's key/value reads (per query tile; a decode row is a tile of its
own), plus a term per sequence, fitted by least squares on relative error to the profile's prefill and mixed steps (the
grid's, and those of its real run).
`fit_report` holds each fit's residuals on the profile's own points.
"""
from __future__ import annotations

import bisect

import numpy as np

from pagedlab.sim.profiles import load_profile, profile_label, profile_shape


class PiecewiseLinear:
    """y(x) through the points, linear between them and along the end segments beyond them; never below zero."""

    def __init__(self, xs, ys) -> None:
        order = np.argsort(xs)
        self.xs = [float(xs[i]) for i in order]
        self.ys = [float(ys[i]) for i in order]

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if len(xs) == 1:
            return max(ys[0], 0.0)
        i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
        w = (x - xs[i]) / (xs[i + 1] - xs[i])
        return max(ys[i] + w * (ys[i + 1] - ys[i]), 0.0)


def hat_basis(x, knots) -> np.ndarray:
    """[len(x), len(knots)]: the weights of piecewise-linear interpolation between knots (extrapolating linearly)."""
    k, x = np.asarray(knots, float), np.asarray(x, float)
    basis = np.zeros((len(x), len(k)))
    if len(k) == 1:
        basis[:, 0] = 1.0
        return basis
    i = np.clip(np.searchsorted(k, x, side="right") - 1, 0, len(k) - 2)
    w = (x - k[i]) / (k[i + 1] - k[i])
    rows = np.arange(len(x))
    basis[rows, i] = 1 - w
    basis[rows, i + 1] += w
    return basis


def residuals(predicted, measured) -> dict:
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    if not len(m):
        return {"points": 0}
    rel = (p - m) / m
    return {"points": int(len(m)), "mean_abs_pct": round(float(100 * np.abs(rel).mean()), 2),
            "max_abs_pct": round(float(100 * np.abs(rel).max()), 2),
            "total_bias_pct": round(float(100 * (p.sum() - m.sum()) / m.sum()), 2)}


def prefill_tile(max_query_len: int, engine: dict) -> int:
    """New tokens per query tile of the prefill kernel for a batch (kernels/attention.py's paged_prefill_attention)."""
    group_block = engine["prefill_group_block"]
    rows = 1 << max(0, (max_query_len * group_block - 1).bit_length())
    block_m = min(engine["prefill_block_m"], max(engine["prefill_min_rows"], rows))
    return max(1, block_m // group_block)


def attention_reads(chunks, engine: dict) -> int:
    """Key/value tokens the prefill kernel reads for (new tokens, cached tokens) chunks: each query tile reads up to
    its last token's position."""
    if not chunks:
        return 0
    tile = prefill_tile(max(q for q, _ in chunks), engine)
    total = 0
    for q, p in chunks:
        k = -(-q // tile)
        total += k * p + tile * (k - 1) * k // 2 + q
    return total


class ProfiledCostModel:
    source = "profile"

    def __init__(self, profile, use_run_steps: bool = True) -> None:
        """use_run_steps: fit the eager model to the real run's prefill and mixed steps too, not the grid alone."""
        self.profile = profile = load_profile(profile)
        self.model = profile_shape(profile)
        self.engine = profile["engine"]
        self.graph_sizes = list(self.engine["cuda_graph_batch_sizes"])
        self.fit_report: dict = {}
        self._fit_decode(profile["decode"])
        self.decode_scale, self.uneven = 1.0, 0.0
        if use_run_steps:
            self._scale_decode([p for p in profile["host"]["points"] if p["num_tokens"] == p["num_seqs"]])
        run_steps = [{**p, "seconds": p["runner_seconds"]} for p in profile["host"]["points"]
                     if use_run_steps and p["num_tokens"] != p["num_seqs"]]
        self._fit_eager(profile["eager"]["points"] + run_steps)
        self._fit_host(profile["host"]["points"])
        self._fit_moves(profile.get("block_moves", {}))

    # --- fits ----------------------------------------------------------------------------------------------------
    def _fit_decode(self, decode: dict) -> None:
        self.decode_sizes = list(decode["batch_sizes"])
        self.decode_curves = {b: PiecewiseLinear([b * c for c in decode["contexts"]], row)
                              for b, row in zip(self.decode_sizes, decode["seconds"])}
        self.pad_row_s = 0.0
        padded = [p for p in decode.get("padded", []) if self.graph_sizes]
        if padded:      # the per-row term: least squares through zero on what the bucket's curve leaves over
            gaps = [(p["num_seqs"] - self._bucket(p["num_seqs"]),
                     p["seconds"] - self.decode_curves[self._bucket(p["num_seqs"])](p["num_seqs"] * p["context"]))
                    for p in padded]
            self.pad_row_s = sum(d * r for d, r in gaps) / sum(d * d for d, _ in gaps)
        measured = [t for row in decode["seconds"] for t in row] + [p["seconds"] for p in padded]
        predicted = [self.decode_runner_time(b, b * c) for b in self.decode_sizes for c in decode["contexts"]]
        predicted += [self.decode_runner_time(p["num_seqs"], p["num_seqs"] * p["context"]) for p in padded]
        self.fit_report["decode"] = residuals(predicted, measured) | {"pad_row_us": round(1e6 * self.pad_row_s, 3)}

    def _scale_decode(self, steps: list[dict]) -> None:
        """The grid's decode batches repeat one synthetic step whose sequences all have one context; served steps
        cost more. Two numbers fitted to the real run's decode steps correct the curves: `uneven`, the share of
        the gap to the longest context that counts as context (with one split per sequence, the attention kernel
        waits for its longest sequence), and a factor (ratio of sums: what throughput sees) for the rest (the
        cache's scattered blocks, whatever ran in between). A step over 5x its prediction (a compilation, a
        collection) is left out; `uneven` stays 0 where the run did not record its longest contexts, and on a CPU
        (its reference attention loops over each sequence's own context)."""
        rows = [(p["runner_seconds"], p["num_seqs"], p["chunks"]["decode_context"],
                 p["chunks"].get("decode_max_context")) for p in steps]
        rows = [r for r in rows if 0 < r[0] < 5 * self.decode_runner_time(r[1], r[2])]
        if not rows:
            return
        # the error counts where the longest is known; only the GPU's split-KV kernel waits for its longest sequence
        gpu = self.engine.get("device", "").startswith("cuda")
        known = [bool(gpu and r[3] and r[3] > 0) for r in rows]
        best = None
        for uneven in [i / 50 for i in range(51)] if any(known) else [0.0]:
            self.uneven = uneven
            predicted = [self.decode_runner_time(n, c, m) for _, n, c, m in rows]
            scale = sum(r[0] for r in rows) / sum(predicted)
            error = sum((r[0] - scale * q) ** 2 for r, q, k in zip(rows, predicted, known) if k or not any(known))
            if best is None or error < best[0]:
                best = (error, uneven, scale)
        _, self.uneven, self.decode_scale = best
        self.fit_report["decode"].update(run_scale=round(self.decode_scale, 4), uneven=self.uneven,
                                         run_steps=len(rows))

    def _fit_eager(self, points: list[dict]) -> None:
        tokens = np.array([p["num_tokens"] for p in points], float)
        self.eager_knots = sorted({int(t) for t in tokens})
        design = np.hstack([hat_basis(tokens, self.eager_knots),
                            np.array([[p["attention_reads"], p["num_seqs"]] for p in points], float)])
        measured = np.array([p["seconds"] for p in points], float)
        weights = 1.0 / measured                    # relative error: times span two orders of magnitude
        coef, *_ = np.linalg.lstsq(design * weights[:, None], measured * weights, rcond=None)
        k = len(self.eager_knots)
        self.eager_base = PiecewiseLinear(self.eager_knots, coef[:k])
        self.read_s, self.seq_s = float(coef[k]), float(coef[k + 1])
        self.fit_report["eager"] = residuals(design @ coef, measured) | {
            "attention_read_ns": round(1e9 * self.read_s, 4), "per_seq_us": round(1e6 * self.seq_s, 3)}

    def _fit_host(self, points: list[dict]) -> None:
        seqs = np.array([p["num_seqs"] for p in points], float)
        knots = [k for k in (1, 4, 16, 64, 128, 192, 256, 384, 512) if k <= seqs.max()] or [1]
        if knots[-1] < seqs.max():
            knots.append(int(seqs.max()))
        design = np.hstack([hat_basis(seqs, knots), np.array([[p["prefill_tokens"]] for p in points], float)])
        measured = np.array([p["seconds"] for p in points], float)
        coef, *_ = np.linalg.lstsq(design, measured, rcond=None)
        self.host_base = PiecewiseLinear(knots, coef[:len(knots)])
        self.host_prefill_s = float(coef[len(knots)])
        predicted = design @ coef
        self.fit_report["host"] = {"points": len(points), "mean_ms": round(1e3 * float(measured.mean()), 4),
                                   "mean_abs_error_ms": round(1e3 * float(np.abs(predicted - measured).mean()), 4),
                                   "total_bias_pct": round(float(100 * (predicted.sum() - measured.sum())
                                                                 / measured.sum()), 3),
                                   "per_prefill_token_us": round(1e6 * self.host_prefill_s, 4)}

    def _fit_moves(self, moves: dict) -> None:
        self.moves = {}
        for kind in ("swap_out", "swap_in", "copy"):
            points = moves.get(kind, [])
            if len(points) >= 2:
                blocks = np.array([p["blocks"] for p in points], float)
                fixed, per_block = np.polyfit(blocks, [p["seconds"] for p in points], 1)[::-1]
                self.moves[kind] = (max(float(fixed), 0.0), max(float(per_block), 0.0))
            else:                   # not profiled: the roofline's PCIe estimate
                self.moves[kind] = (0.0, self.model.kv_bytes_per_token * self.engine["block_size"] / 25e9)

    # --- times ---------------------------------------------------------------------------------------------------
    def _bucket(self, num_seqs: int) -> int:
        return self.graph_sizes[bisect.bisect_left(self.graph_sizes, num_seqs)]

    def decode_runner_time(self, num_seqs: int, context: int, max_context: int | None = None) -> float:
        """The runner's time for a decode batch of `context` tokens in all; `max_context`, its longest sequence's,
        moves the effective context towards num_seqs x max_context by the fitted `uneven` share."""
        if max_context and self.uneven:
            context += self.uneven * max(num_seqs * max_context - context, 0)
        if self.graph_sizes and num_seqs <= self.graph_sizes[-1]:
            bucket = self._bucket(num_seqs)
            if bucket in self.decode_curves:        # padding rows attend to one token each
                return self.decode_curves[bucket](context + bucket - num_seqs) + self.pad_row_s * (num_seqs - bucket)
        sizes = self.decode_sizes
        if len(sizes) == 1:
            return self.decode_curves[sizes[0]](context * sizes[0] / num_seqs)
        i = min(max(bisect.bisect_right(sizes, num_seqs) - 1, 0), len(sizes) - 2)
        lo, hi = sizes[i], sizes[i + 1]         # at the same mean context, linear in the batch size
        t_lo, t_hi = self.decode_curves[lo](context * lo / num_seqs), self.decode_curves[hi](context * hi / num_seqs)
        return max(t_lo + (num_seqs - lo) / (hi - lo) * (t_hi - t_lo), 0.0)

    def eager_runner_time(self, num_tokens: int, reads: int, num_seqs: int) -> float:
        return max(self.eager_base(num_tokens) + self.read_s * reads + self.seq_s * num_seqs, 0.0)

    def host_time(self, num_seqs: int, prefill_tokens: int) -> float:
        return max(self.host_base(num_seqs) + self.host_prefill_s * prefill_tokens, 0.0)

    def decode_time(self, num_seqs: int, context: int, max_context: int | None = None) -> float:
        return self.host_time(num_seqs, 0) + self.decode_scale * self.decode_runner_time(num_seqs, context,
                                                                                          max_context)

    def moves_time(self, swapped_out: int, swapped_in: int, copied: int) -> float:
        total = 0.0
        for kind, blocks in (("swap_out", swapped_out), ("swap_in", swapped_in), ("copy", copied)):
            if blocks:
                fixed, per_block = self.moves[kind]
                total += fixed + per_block * blocks
        return total

    def batch_time(self, out, block_size: int) -> float:
        moves = self.moves_time(len(out.blocks_to_swap_out), len(out.blocks_to_swap_in), len(out.blocks_to_copy))
        if not out.seq_ids:
            return moves
        n = len(out.seq_ids)
        tokens = sum(out.num_scheduled_tokens)
        if tokens == n:         # every sequence computes one token: the runner's decode path
            ends = [start + 1 for start in out.num_computed_tokens]
            return (self.host_time(n, 0) + moves
                    + self.decode_scale * self.decode_runner_time(n, sum(ends), max(ends)))
        chunks = list(zip(out.num_scheduled_tokens, out.num_computed_tokens))
        prefill = sum(q for q, _ in chunks if q > 1)
        return (self.host_time(n, prefill) + self.eager_runner_time(tokens, attention_reads(chunks, self.engine), n)
                + moves)

    def describe(self) -> str:
        decode, eager = self.fit_report["decode"], self.fit_report["eager"]
        return (f"measured: {profile_label(self.profile)} (decode grid {len(self.decode_sizes)} batch sizes x "
                f"{len(self.profile['decode']['contexts'])} contexts, {eager['points']} prefill/mixed steps, "
                f"host time per step; fit residuals: decode {decode['mean_abs_pct']}% mean, "
                f"prefill/mixed {eager['mean_abs_pct']}% mean)")
