"""Launchers of the embedding-bag kernels (hashemb/_gpu/bag.cu): what
hashemb.bag calls for CuPy arrays. Same arguments, checks and results as the
CPU kernels; backward adds with atomics (default) or, deterministic, through
a stable sort and ordered per-slot sums that reproduce the CPU bit for bit."""
import numpy as np

from .. import _validate as V
from ..bag import BagSaved
from ..optim import SGD, Adagrad, RowwiseAdagrad, check_optimizer
from . import _args as A
from . import _runtime as RT
from ._runtime import i64

_FULL = 0


# Elements a lane serves per pass over a bag's entries, forward and backward,
# in bag_forward / bag_backward (offsets input, signed schemes, rows of many
# runs; one-entry 2-D bags take the warp kernels below unless ROWS is off).
# Measured with benchmarks/gpu_profile.py on an H200 (RobeZ 1000x, D=16, 26 x
# 16384 bags, then all through bag_forward, kernel alone), at 1 / 2 / 4 per lane: forward 152 / 92 / 65 us
# (per-lane slot math), 92 / 55 / 40 us (precomputed starts); backward (SGD,
# atomics) 111 / 87 / 101 us. Each takes the fastest of that run. A forward
# at 8 or 16 (one lane per bag at D=16, so one hash per entry instead of 4)
# runs through the 16-slot instantiation (128 registers against 80: ptxas,
# sm_90) and is not yet measured; other D are not yet measured either. Any
# value gives the same results: a lane makes as many passes as it needs.
FORWARD_PER = 4
BACKWARD_PER = 2


def lanes(dim, per):
    """Lanes per bag: the power of two >= min(dim, 32 * per) / per, so that a
    lane serves up to ``per`` elements per pass over the bag's entries,
    sharing a thread's index and offset work between them."""
    return 1 << max(0, (-(-min(dim, 32 * per) // per) - 1).bit_length())


# One-entry bags (2-D input, or offsets of one entry a bag) go through the
# warp kernels bag_forward_rows / bag_backward_rows, a warp per 32 entries:
# one index read and row hash per entry, then contiguous row copies. Not yet
# measured on a device; False sends them through bag_forward / bag_backward
# (gpu_profile's A/B).
ROWS = True
ROW_RUNS = 4        # bag.cu HE_ROW_RUNS: run starts a lane keeps per entry
# Entries a lane of those kernels loads before it stores (or adds) any: the
# loads in flight per lane (bag.cu he_rows_each). 4 by the PTX, where one at
# a time made each store wait for its load; not yet measured on a device.
# gpu_profile sweeps 1, 2, 4 and 8 (float32 weights, int64 indices, unsigned
# schemes: bag.cu lists those instantiations for each).
ROWS_CHUNK = 4


def _rows(b):
    """Do the one-entry warp kernels take this batch: every bag holds one
    entry (2-D input of one a bag, or offsets the pre-launch check found
    so; with check_indices=False offsets go to the general kernels)?"""
    return ROWS and b.single


def _rows_launch(b, dim):
    """(threads, the (entries, B, T, fm) arguments, P) of a warp kernel
    launch: a warp per 32 entries; bag (t, b)'s entry is b*T + t for 2-D
    input, t*B + b (fm) for offsets input; P lanes a row."""
    n = b.B * b.T
    return (-(-n // 32) * 32, [i64(n), i64(b.B), i64(b.T), i64(b.off is not None)],
            i64(lanes(min(dim, 32), 1)))


def _rows_args(scheme, st):
    """Template arguments ST, GEN, C of a one-entry warp kernel: GEN keeps
    each row's hash state, and derives every element's start and sign from
    it, where a row's run starts do not pay (signed schemes; more than
    ROW_RUNS runs a row: HashedNet); C is ROWS_CHUNK."""
    gen = scheme._signed or scheme.dim // scheme._run > ROW_RUNS
    return f"{st}, {'true' if gen else 'false'}, {ROWS_CHUNK}"


def _forward_ept(per):
    """The forward kernel's register slots (template EPT) for ``per``."""
    return 4 if per <= 4 else 16


def _starts_pay(scheme):
    """Do run starts pay for an unsigned scheme: few runs per row, and not a
    full table (whose starts are a multiply)?"""
    return not scheme._signed and scheme.dim // scheme._run <= 4 and scheme._kind != _FULL


def _use_starts(scheme, inline=False):
    """Precompute the run starts (bag_starts, then the ST kernels)? Only
    unsigned schemes can. By default only for a backward (of few runs per
    row) not given them, and not where the launch hashes each row once
    itself (``inline``: a forward hashes per lane in its one launch, and one
    that keeps them for its backward writes them as it goes, _keeps; the
    one-entry warp kernels hash once per entry); one launch beat two on the
    H200, where host time per launch dominates."""
    opt = RT.OPTIONS["precompute_starts"]
    if opt is not None:
        return bool(opt) and not scheme._signed
    return not inline and _starts_pay(scheme)


def _keeps(scheme, return_saved):
    """Does a forward write the run starts for its backward as it hashes?"""
    return return_saved and RT.OPTIONS["precompute_starts"] is None and _starts_pay(scheme)


_NO_KEYS = {}


def _no_keys(be):
    """A zero-length int64 array for the keys a scatter into the target
    never writes (out_mode 0): made once per backend and device, not per
    call (an allocation is a host cost of every training step)."""
    k = (be.key, be.current_device())
    a = _NO_KEYS.get(k)
    if a is None:
        a = _NO_KEYS[k] = be.xp.empty(0, np.int64)
    return a


def _st(starts):
    """The ST template argument of a bag kernel: were the run starts given?"""
    return "true" if starts is not None else "false"


def storage_arg(dtype):
    """The S template argument of a kernel that reads or writes a weight of
    ``dtype``, as a suffix: none for float32 / float64 (S = R), ", unsigned
    short" for float16 storage (its bits, read as floats), ", he_bf16" for
    bfloat16 (CuPy 14 arrays of ml_dtypes' dtype)."""
    return {None: "", 0: ", unsigned short", 1: ", he_bf16"}[V.format16(dtype)]


def _i64_bits(v):
    """A 64-bit unsigned value (a rounding seed) as the signed kernel argument
    of the same bits."""
    return i64(v - (1 << 64) if v >= 1 << 63 else v)


def _common(be, scheme, b, table0, given=None, inline=False):
    """(struct, layout args, the run starts or None) shared by every bag
    launch; ``given``: the starts a forward of the same inputs kept. With
    starts, the launches use the kernels' ST instantiation (no slot math)."""
    s = RT.scheme_struct(be, scheme)
    n = b.n
    use_off = b.off is not None
    off = b.off if use_off else b.idx
    starts, use = b.idx, False
    if n and ((given is not None and not scheme._signed) or _use_starts(scheme, inline)):
        R = scheme.dim // scheme._run
        if given is not None and given.shape[0] == n * R:
            starts = given
        else:
            starts = be.xp.empty(n * R, np.uint64)
            be.launch("bag", f"bag_starts<{RT.ctype(b.idx.dtype)}>", n * R,
                      [s, b.idx, i64(n), off, i64(use_off), i64(b.B), i64(b.T),
                       i64(b.rowlen), i64(table0), starts])
        use = True
    layout = [b.idx, off, i64(use_off), i64(b.rowlen), i64(b.nper), starts]
    return s, layout, starts if use else None


def forward(indices, weight, offsets, scheme, table0, T, mode, per_sample_weights,
            include_last_offset, padding_idx, be=None, return_saved=False):
    be = be or RT.backend()
    A.as_array(be, weight, "weight")
    with be.device_of(weight):
        scheme = V.check_scheme(scheme)
        dtype = A.weight_dtype(be, weight, storage=True)
        b = A.bags(be, indices, offsets, per_sample_weights, scheme=scheme, mode=mode,
                   dtype=dtype, table0=table0, num_tables=T,
                   include_last_offset=include_last_offset, padding_idx=padding_idx)
        w = A.as_weight(be, weight, scheme, storage=True)
        out = be.xp.empty((b.B, T * scheme.dim), dtype)

        def result(starts):
            if not return_saved:
                return out
            return out, BagSaved(starts, scheme, table0, T, b.B, b.n, b.mode, True,
                                 b.pad if b.has_pad else None)
        if b.B == 0 or T == 0:
            return result(None)
        n = b.n
        keep = (be.xp.empty(n * (scheme.dim // scheme._run), np.uint64)
                if n and _keeps(scheme, return_saved) else None)
        # a forward precomputes starts only when asked (precompute_starts=True);
        # by default its one launch hashes (per entry in the warp kernels, per
        # lane in bag_forward), writing the starts to `keep` for a backward
        s, layout, starts = _common(be, scheme, b, table0, inline=True)
        psw = b.psw if b.psw is not None else out      # (unread: any pointer of type R)
        S = storage_arg(w.dtype)
        tail = [keep if keep is not None else out, i64(keep is not None)]
        if _rows(b):
            threads, layout, P = _rows_launch(b, scheme.dim)
            be.launch("bag", f"bag_forward_rows<{RT.ctype(dtype)}, {RT.ctype(b.idx.dtype)}, "
                             f"{_rows_args(scheme, _st(starts))}{S}>", threads,
                      [s, b.idx] + layout + [i64(table0),
                       starts if starts is not None else b.idx, w, psw, i64(b.psw is not None),
                       out, i64(b.mode), i64(b.has_pad), i64(b.pad), P] + tail)
        else:
            W = lanes(scheme.dim, FORWARD_PER)
            be.launch("bag", f"bag_forward<{RT.ctype(dtype)}, {RT.ctype(b.idx.dtype)}, "
                             f"{_st(starts)}, {_forward_ept(FORWARD_PER)}{S}>",
                      b.B * T * W,
                      [s] + layout + [w, psw, i64(b.psw is not None), out, i64(b.B), i64(T),
                                      i64(table0), i64(b.mode), i64(b.has_pad), i64(b.pad),
                                      i64(W)] + tail)
        return result(keep if keep is not None else starts)


def backward(grad_output, indices, offsets, scheme, table0, T, mode, per_sample_weights,
             include_last_offset, padding_idx, weight, optimizer, deterministic=None, be=None,
             saved=None):
    be = be or RT.backend()
    xp = be.xp
    scheme = V.check_scheme(scheme)
    V.check_mode(mode)
    optimizer = check_optimizer(optimizer, scheme, mode)
    V.check_backward_weight(weight, mode, optimizer)
    anchor = weight if weight is not None else A.as_array(be, grad_output, "grad_output")
    A.as_array(be, anchor, "weight")
    with be.device_of(anchor):
        dtype = A.weight_dtype(be, weight, storage=True) if weight is not None else \
            A.as_float(be, grad_output, "grad_output").dtype
        b = A.bags(be, indices, offsets, per_sample_weights, scheme=scheme, mode=mode,
                   dtype=dtype, table0=table0, num_tables=T,
                   include_last_offset=include_last_offset, padding_idx=padding_idx)
        g = A.as_grad(be, grad_output, (b.B, T * scheme.dim), dtype)
        given = V.check_bag_saved(saved, BagSaved, scheme, table0, T, b.B, b.n,
                                  b.mode, True, b.pad if b.has_pad else None)
        w = None if weight is None else A.as_weight(be, weight, scheme,
                                                     writable=optimizer is not None,
                                                     storage=True)
        half = w is not None and V.is16(w.dtype)
        det = RT.OPTIONS["deterministic"] if deterministic is None else bool(deterministic)
        # only the warp kernel runs (no deterministic pairs, no apply walk,
        # which still read precomputed starts best)
        rows_only = (_rows(b) and not det and not isinstance(optimizer, (Adagrad, RowwiseAdagrad))
                     and not (half and optimizer is not None))
        run = _Runner(be, scheme, b, table0, g, w, dtype, given, rows_only)
        if optimizer is None:
            grad = xp.zeros(scheme.size, dtype)
            run.add(grad, 1.0, det)
            return grad.reshape(weight.shape if weight is not None else scheme.weight_shape)
        if isinstance(optimizer, RowwiseAdagrad) or _per_row(scheme, b, optimizer, half):
            run.rows(w, optimizer)
        elif half:
            run.two_phase(w, optimizer, det)
        elif isinstance(optimizer, SGD):
            run.add(w, -optimizer.lr, det)
        else:
            state, scratch = optimizer.state_for(w)
            run.adagrad(w, state, scratch, optimizer.lr, optimizer.eps, det)
        return None


def _per_row(scheme, b, optimizer, half):
    """Does a two-phase step (Adagrad; SGD of 16-bit storage) of a full
    table sum per row (_Runner.rows) rather than in a scratch the size of
    the table: where the table is large next to the batch (the CPU's
    wants_scratch rule) and not in max mode (whose winners are per
    element)."""
    return (scheme._kind == _FULL and b.mode != 2 and (half or isinstance(optimizer, Adagrad))
            and scheme.size > 8 * scheme.dim * b.n)


class _Runner:
    """One backward batch: the scatter kinds over the same normalised bags."""

    def __init__(self, be, scheme, b, table0, g, w, dtype, given=None, rows_only=False):
        self.be, self.scheme, self.b, self.table0, self.g, self.dtype = be, scheme, b, table0, g, dtype
        self.w = w if w is not None else g       # read only in max mode (weight given there)
        self.n = b.n
        self.empty = b.B == 0 or b.T == 0 or self.n == 0
        starts = None
        if not self.empty:
            # one-entry bags hash in their warp kernel (once per entry, as
            # bag_starts would): no separate launch for starts not given
            self.s, self.layout, starts = _common(be, scheme, b, table0, given,
                                                  inline=rows_only)
        self.starts = starts
        self.W = lanes(scheme.dim, BACKWARD_PER)
        self.R = RT.ctype(dtype)
        self.tname = f"{self.R}, {RT.ctype(b.idx.dtype)}, {_st(starts)}"
        self.S = storage_arg(self.w.dtype)      # bag_backward reads the weight (max mode)

    def _scalar(self, v):
        return RT.real(self.dtype, v)

    def _backward(self, alpha, out_mode, target, keys, vals):
        b = self.b
        self.be.launch("bag", f"bag_backward<{self.tname}{self.S}>", b.B * b.T * self.W,
                       [self.s] + self.layout + [
                           b.psw if b.psw is not None else self.g, i64(b.psw is not None),
                           self.g, i64(b.B), i64(b.T), i64(self.table0), i64(b.mode),
                           i64(b.has_pad), i64(b.pad), i64(self.W), self.w,
                           self._scalar(alpha), i64(out_mode), target, keys, vals])

    def _pairs(self, alpha, sort=True):
        """(slot keys, values) of every contribution, sorted stably by slot."""
        xp, b, D = self.be.xp, self.b, self.scheme.dim
        npos = (b.B * b.T if b.mode == 2 else self.n) * D
        keys = xp.full(npos, np.int64(np.iinfo(np.int64).max), np.int64)
        vals = xp.zeros(npos, self.dtype)
        self._backward(alpha, 1, vals, keys, vals)
        if not sort:
            return keys, vals
        order = self.be.stable_argsort(keys)
        return keys[order], vals[order]

    def _segments(self, keys, vals, act, target, state, lr, eps):
        self.be.launch("segment", f"seg_apply<{self.R}>", keys.shape[0],
                       [keys, vals, i64(keys.shape[0]), i64(act), target,
                        state if state is not None else target, self._scalar(lr),
                        self._scalar(eps)])

    def add(self, target, alpha, det):
        """target[slot] += alpha * contribution (gradient, or SGD with alpha = -lr)."""
        if self.empty:
            return
        if det:
            keys, vals = self._pairs(alpha)
            self._segments(keys, vals, 0, target, None, 0.0, 0.0)
        elif _rows(self.b):
            # also max-mode SGD: a one-entry bag's winner is its entry, so
            # no weight is read while the step moves it
            b = self.b
            threads, layout, P = _rows_launch(b, self.scheme.dim)
            self.be.launch("bag", f"bag_backward_rows<{self.R}, {RT.ctype(b.idx.dtype)}, "
                                  f"{_rows_args(self.scheme, _st(self.starts))}>", threads,
                           [self.s, b.idx] + layout + [i64(self.table0),
                            self.starts if self.starts is not None else b.idx,
                            b.psw if b.psw is not None else self.g, i64(b.psw is not None),
                            self.g, self._scalar(alpha), i64(b.has_pad), i64(b.pad), P,
                            target])
        elif self.b.mode == 2 and target is self.w:
            # max-mode SGD: every winner is read from the weight before it moves
            keys, vals = self._pairs(alpha, sort=False)
            self.be.launch("segment", f"pairs_add<{self.R}>", keys.shape[0],
                           [keys, vals, i64(keys.shape[0]), target])
        else:
            self._backward(alpha, 0, target, _no_keys(self.be), target)

    def adagrad(self, w, state, scratch, lr, eps, det):
        if self.empty:
            return
        if det:
            keys, vals = self._pairs(1.0)
            self._segments(keys, vals, 1, w, state, lr, eps)
            return
        self.add(scratch, 1.0, False)
        self._apply(w, scratch, state, lr, eps, 1, 0)

    def two_phase(self, w, optimizer, det):
        """A 16-bit weight's step: the gradient summed into the optimizer's
        float32 scratch (deterministic: bitwise the CPU's), then each touched
        slot updated once and rounded (the CPU's order of work)."""
        if self.empty:
            return
        adagrad = isinstance(optimizer, Adagrad)
        state, scratch = optimizer.state_for(w) if adagrad else (None, optimizer.scratch_for(w))
        self.add(scratch, 1.0, det)
        self._apply(w, scratch, state if adagrad else scratch, optimizer.lr,
                    optimizer.eps if adagrad else 0.0, int(adagrad), optimizer._round_seed(w))

    def rows(self, w, optimizer):
        """A full table's two-phase step summed per row, with no scratch the
        size of the table: one (row, scale, gradient row) key per entry
        (bag_row_keys), a stable sort by row, then each row summed in entry
        order, a thread per (row, element), and moved once (seg_rows:
        Adagrad, or SGD of 16-bit storage; row-wise Adagrad keeps the sums,
        n*D values, for seg_rows_apply's square sum). Deterministic, and
        bitwise the CPU's per-row step (_rows_owned)."""
        if self.empty:
            return
        xp, b, D = self.be.xp, self.b, self.scheme.dim
        if isinstance(optimizer, RowwiseAdagrad):
            rule, state = 2, optimizer.state_for(w, self.scheme.size // D)
        elif isinstance(optimizer, Adagrad):
            rule, state = 1, optimizer._state(w, w.size)
        else:
            rule, state = 0, None
        keys = xp.full(self.n, np.int64(np.iinfo(np.int64).max), np.int64)
        vals = xp.empty(self.n, self.dtype)
        grow = xp.empty(self.n, np.int64)
        self.be.launch("bag", f"bag_row_keys<{self.tname}>", b.B * b.T,
                       [self.s] + self.layout + [
                           b.psw if b.psw is not None else self.g, i64(b.psw is not None),
                           i64(b.B), i64(b.T), i64(self.table0), i64(b.mode), i64(b.has_pad),
                           i64(b.pad), keys, vals, grow])
        order = self.be.stable_argsort(keys)
        keys, vals, grow = keys[order], vals[order], grow[order]
        S = storage_arg(w.dtype)
        lr, eps = self._scalar(optimizer.lr), self._scalar(getattr(optimizer, "eps", 0.0))
        seed = _i64_bits(optimizer._round_seed(w))
        # row-wise Adagrad: each row's sums, D a position (read at a row's first)
        acc = xp.empty(self.n * D, self.dtype) if rule == 2 else vals
        self.be.launch("segment", f"seg_rows<{self.R}{S}>", self.n * D,
                       [keys, vals, grow, i64(self.n), self.g, i64(D), w,
                        state if state is not None else vals, lr, eps, i64(rule), seed, acc])
        if rule == 2:
            self.be.launch("segment", f"seg_rows_apply<{self.R}{S}>", self.n,
                           [keys, i64(self.n), acc, i64(D), w, state, lr, eps, seed])

    def _apply(self, w, scratch, state, lr, eps, rule, seed):
        """The apply pass (he_apply: rule 1 Adagrad, 0 SGD; seed: 16-bit
        rounding) where scratch is non-zero, clearing it."""
        m, D, b = self.scheme.size, self.scheme.dim, self.b
        S = storage_arg(w.dtype)
        tail = [self._scalar(lr), self._scalar(eps), i64(rule), _i64_bits(seed)]
        if m <= 8 * D * self.n:       # the CPU's rule: sweep a small array, else walk the batch
            self.be.launch("segment", f"adagrad_sweep<{self.R}{S}>", m,
                           [w, scratch, state, i64(m)] + tail)
        else:
            self.be.launch("bag", f"bag_adagrad_walk<{self.tname}{S}>", b.B * b.T * self.W,
                           [self.s] + self.layout + [
                               i64(b.B), i64(b.T), i64(self.table0), i64(b.has_pad), i64(b.pad),
                               i64(self.W), w, scratch, state] + tail)
