"""Autograd through hashemb's kernels: tensors are viewed as arrays with DLPack
(no copy), the kernels run, the result is viewed back as a tensor. CPU
tensors run the CPU kernels; CUDA tensors (BagFunction) the CuPy backend, on
torch's current device and stream."""
import contextlib
import functools

import numpy as np
import torch

from .. import _validate as V, bag as _bag
from .._backend import array_module
from ..optim import SGD, Adagrad, RowwiseAdagrad


def check_cpu(t, name):
    """``t`` itself, or a TypeError naming ``name`` if it is not on the CPU."""
    if t.device.type != "cpu":
        raise TypeError(f"{name}: expected a CPU tensor here (CUDA tensors run through "
                        f"BagFunction's CuPy path), got a tensor on {t.device}")
    return t


def bfloat16():
    """ml_dtypes' bfloat16 NumPy dtype, which a bfloat16 tensor is viewed as
    (NumPy has no bfloat16 of its own)."""
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError("bfloat16 weights need the ml_dtypes package (NumPy's bfloat16 "
                          "dtype): pip install ml_dtypes") from None
    return np.dtype(ml_dtypes.bfloat16)


def as_array(t, name):
    """Zero-copy NumPy view of a CPU tensor (None passes through). ``.numpy()``
    rather than DLPack: the same view at a third of the cost (1.5 vs 4.3 us),
    which counts at small batches (so is every check here: a batch of one
    takes a few microseconds in all). A bfloat16 tensor is viewed through its
    bits as ml_dtypes' bfloat16."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_cpu:
        check_cpu(t, name)
    if t.requires_grad:
        t = t.detach()
    if t.dtype is torch.bfloat16:
        return t.resolve_neg().view(torch.int16).numpy().view(bfloat16())
    return _numpy(t)


def _numpy(t):
    try:
        return t.numpy()
    except RuntimeError:    # a conjugate or negative view: its values, resolved
        if not (t.is_conj() or t.is_neg()):
            raise
        return t.resolve_conj().resolve_neg().numpy()


def as_any_array(t, name):
    """as_array for CPU tensors; a zero-copy CuPy view (DLPack) of a CUDA one."""
    if t is None or not isinstance(t, torch.Tensor) or not t.is_cuda:
        return as_array(t, name)
    import cupy
    if t.dtype == torch.bfloat16:
        # CuPy 14 has bfloat16 (ml_dtypes' dtype): the tensor's bits, viewed
        # as it (DLPack carries int16 on every CuPy version)
        bits = cupy.from_dlpack(t.detach().view(torch.int16))
        try:
            return bits.view(bfloat16())
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name}: a torch.bfloat16 tensor on CUDA needs CuPy 14 or newer "
                            f"with ml_dtypes (CuPy's bfloat16), got CuPy {cupy.__version__} "
                            f"({e})") from None
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return cupy.from_dlpack(t)


def check_device(device):
    """A module's ``device`` keyword as a torch.device (None stays None)."""
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected a torch device, got {device!r} ({e})") from None


def as_tensor(a):
    """The result array as a tensor, without a copy (NumPy or CuPy)."""
    if isinstance(a, np.ndarray):
        if V.format16(a.dtype) == 1:       # bfloat16: torch takes its bits
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    return torch.from_dlpack(a)


def device_context(t):
    """CuPy on torch's current device and stream for a CUDA tensor; nothing
    for a CPU one."""
    if not t.is_cuda:
        return contextlib.nullcontext()
    from .._gpu._runtime import torch_stream
    return torch_stream(t)


_NAMED = {"sgd": lambda lr, eps: SGD(lr), "adagrad": Adagrad, "rowwise_adagrad": RowwiseAdagrad}


def optimizer_name(optimizer):
    """The string make_optimizer takes for ``optimizer`` (a name or object)."""
    if optimizer is None or isinstance(optimizer, str):
        return optimizer
    for name, kind in (("rowwise_adagrad", RowwiseAdagrad), ("adagrad", Adagrad),
                       ("sgd", SGD)):
        if isinstance(optimizer, kind):
            return name
    return type(optimizer).__name__.lower()     # make_optimizer names it in its error


def make_optimizer(optimizer, lr, eps):
    """None, "sgd", "adagrad", "rowwise_adagrad" or a hashemb optimizer object."""
    if optimizer is None or isinstance(optimizer, (SGD, Adagrad, RowwiseAdagrad)):
        return optimizer
    if isinstance(optimizer, str) and optimizer in _NAMED:
        return _NAMED[optimizer](lr, eps)
    raise ValueError(f"optimizer: expected None, 'sgd', 'adagrad', 'rowwise_adagrad', "
                     f"hashemb.SGD, hashemb.Adagrad or hashemb.RowwiseAdagrad, "
                     f"got {optimizer!r}")


class Lookup:
    """One normalised call: flat indices, offsets of length T*B+1 (feature-major)."""

    def __init__(self, scheme, num_tables, table=0, mode="sum", padding_idx=None,
                 optimizer=None):
        self.scheme, self.T, self.table, self.mode = scheme, num_tables, table, mode
        self.padding_idx, self.optimizer = padding_idx, optimizer
        self.steps = 0      # fused steps taken: a backward knows whether its forward's array moved

    def forward(self, idx, w, off, psw, return_saved=False):
        if self.T == 1:
            return _bag.embedding_bag(idx, w, off, scheme=self.scheme, table=self.table,
                                      mode=self.mode, per_sample_weights=psw,
                                      include_last_offset=True, padding_idx=self.padding_idx,
                                      return_saved=return_saved)
        return _bag.embedding_bags(idx, w, off, scheme=self.scheme, num_tables=self.T,
                                   mode=self.mode, per_sample_weights=psw,
                                   return_saved=return_saved)

    def backward(self, g, idx, w, off, psw, saved=None):
        if self.T == 1:
            return _bag.embedding_bag_backward(
                g, idx, off, scheme=self.scheme, table=self.table, mode=self.mode,
                per_sample_weights=psw, include_last_offset=True,
                padding_idx=self.padding_idx, weight=w, optimizer=self.optimizer, saved=saved)
        return _bag.embedding_bags_backward(
            g, idx, off, scheme=self.scheme, num_tables=self.T, mode=self.mode,
            per_sample_weights=psw, weight=w, optimizer=self.optimizer, saved=saved)

    def psw_grad(self, g, idx, w, off):
        """d loss / d per_sample_weights[j] = <grad[bag(j)], E(x_j)>: each entry
        is looked up as its own bag (the same kernels), then dotted. NumPy or
        CuPy arrays alike; 2-D input (off None) gives its (B, N) / (B, T) shape."""
        xp = array_module(g)
        if off is None:
            B, N = idx.shape
            if self.T == 1:             # row b is bag b
                off = xp.arange(B + 1, dtype=np.int64) * np.int64(N)
                return self.psw_grad(g, idx.reshape(-1), w, off).reshape(B, N)
            flat = xp.ascontiguousarray(idx.T).reshape(-1)      # feature-major
            off = xp.arange(B * N + 1, dtype=np.int64)
            return xp.ascontiguousarray(self.psw_grad(g, flat, w, off).reshape(N, B).T)
        out = xp.zeros(idx.shape[0], g.dtype)
        B = (off.shape[0] - 1) // self.T
        D = self.scheme.dim
        n = idx.shape[0] // self.T
        if self.T > 1 and n and int(off[-1]) == idx.shape[0] and bool((off[::B] == xp.arange(
                0, self.T * n + 1, n)).all()):
            # every table holds n entries (2-D input, or bags of equal sizes):
            # all looked up in ONE call, entry j of table t as bag j of t (a
            # call per table cost 24 us a table: 20x the step at 4000 tables)
            E = _bag.embedding_bags(idx, w, xp.arange(self.T * n + 1, dtype=np.int64),
                                    scheme=self.scheme, num_tables=self.T)
            bag_of = xp.searchsorted(off, xp.arange(idx.shape[0]), side="right") - 1
            rows = (bag_of % B).reshape(self.T, n)          # table t's entries: row t
            G = g.reshape(g.shape[0], self.T, D)[rows.T, xp.arange(self.T)]   # (n, T, D)
            return xp.ascontiguousarray((E.reshape(n, self.T, D) * G).sum(axis=2).T).reshape(-1)
        for t in range(self.T):
            lo, hi = int(off[t * B]), int(off[(t + 1) * B])
            if hi == lo:
                continue
            seg = idx[lo:hi]
            E = _bag.embedding_bag(seg, w, xp.arange(hi - lo + 1, dtype=np.int64),
                                   scheme=self.scheme, table=self.table + t,
                                   include_last_offset=True, padding_idx=self.padding_idx)
            bag_of = xp.searchsorted(off[t * B:(t + 1) * B + 1], xp.arange(lo, hi),
                                     side="right") - 1
            out[lo:hi] = (E * g[bag_of, t * D:(t + 1) * D]).sum(axis=1)
        return out


def check_psw_shape(psw, input):
    """per_sample_weights of input's shape, as torch.nn.EmbeddingBag asks (a
    flat one of the right count but another shape passed forward, then its
    gradient of input's shape was refused by autograd)."""
    if isinstance(psw, torch.Tensor):
        shape = tuple(input.shape) if isinstance(input, torch.Tensor) else np.shape(input)
        if tuple(psw.shape) != shape:
            raise ValueError(f"per_sample_weights: expected input's shape {shape}, "
                             f"got {tuple(psw.shape)}")


def _rebind(opt, module, arrays):
    """After ``opt`` bound the arrays it steps for ``module``: forget its
    entries of addresses the module held before and holds no more (its
    arrays moved: .double(), .to(), load_state_dict(assign=True)). Torch
    memory is kept by address, so each move kept the old accumulator and an
    array-sized scratch alive: 100 MB a .double() / .float() round trip of a
    16 MB Adagrad array. An accumulator goes only if it is still the one
    this module bound (another module sharing the optimizer may have taken
    the address since); a scratch is zeros between steps, remade if needed."""
    keys = [opt._key(a) for a in arrays]
    state = getattr(opt, "state", None)
    old = module.__dict__.get("_fused_keys")
    if old is not None and old[0] is opt:
        for k, bound in old[1].items():
            if k not in keys:
                opt._scratch.pop(k, None)
                if state is not None and bound is not None and state.get(k) is bound:
                    del state[k]
    module.__dict__["_fused_keys"] = (opt, {k: None if state is None else state.get(k)
                                            for k in keys})


def getstate_unbound(module):
    """A module's pickled state (its ``__getstate__``) without _rebind's
    record: those bound arrays are views of the optimizer's accumulators,
    which pickle, deepcopy and torch.save wrote out as copies (a trained
    Adagrad module pickled at 1.5x its state). The copy's optimizer holds no
    bindings (see the optimizers' __getstate__); its first step binds it."""
    state = torch.nn.Module.__getstate__(module)
    state.pop("_fused_keys", None)
    return state


def records_grad(psw, *params):
    """Whether autograd will record a call on these inputs: grad mode on and
    a parameter or the per-sample weights requiring a gradient. Where it
    will not (inference), the modules run the lookup alone, without their
    autograd.Function."""
    return torch.is_grad_enabled() and (
        any(p.requires_grad for p in params) or (psw is not None and psw.requires_grad))


def plain_lookup(weight, indices, offsets, psw, lookup, return_saved=False):
    """The lookup's result arrays for these tensors: BagFunction's forward,
    and the whole call where autograd records nothing (no_grad, or no input
    that requires a gradient)."""
    with device_context(weight):
        return lookup.forward(as_any_array(indices, "input"), as_any_array(weight, "weight"),
                              as_any_array(offsets, "offsets"),
                              as_any_array(psw, "per_sample_weights"), return_saved=return_saved)


def raise_called_twice(problem):
    """The error of a backward that a fused step of another call's backward
    came before (the module called more than once before backward)."""
    raise RuntimeError(
        f"{problem} (the module was called more than once before backward): call the "
        f"module once per step (concatenate the inputs), or use optimizer=None and a "
        f"torch optimizer")


def raise_stale(what):
    """raise_called_twice where the gradient needs the array as its forward
    read it, and a fused step has moved it since."""
    raise_called_twice(f"the {what} needs the values the forward read, but a fused "
                       f"optimizer step has changed them since")


def compile_opaque(forward):
    """A module's ``forward`` that torch.compile calls as it is rather than
    tracing (traced, the NumPy glue broke the graph 24-47 times a step,
    bfloat16 arrays failed in torch._numpy, and a TT module's step counter
    recompiled every step); eager calls pay a flag test (0.1 us), not
    torch.compiler.disable's context (1.6 us a call)."""
    opaque = torch.compiler.disable(forward)

    @functools.wraps(forward)
    def call(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return opaque(self, *args, **kwargs)
        return forward(self, *args, **kwargs)
    return call


def refuse_computed(params, name, how_off):
    """A fused step moves the tensors forward was given, in place: one
    computed from others (a parametrization, or functional_call given a
    computed tensor) is a temporary, and the parameter would never train."""
    if any(p.requires_grad and not p.is_leaf for p in params):
        raise RuntimeError(
            f"{name}: a fused optimizer updates them in place, so they must be leaf tensors; "
            f"got one computed from others (a parametrization, or functional_call given a "
            f"computed tensor): build the module with {how_off} and train it with a torch "
            f"optimizer")


def refuse_double_backward(what):
    """A backward run with create_graph=True (grad mode on inside it): the
    kernels record no graph, so second-order terms through ``what`` would be
    silently missing (a gradient penalty came out wrong); refused."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{what}: double backward (create_graph=True) is not supported: "
                           f"its gradient comes from kernels that record no graph, so "
                           f"second-order terms through it would be missing; take the "
                           f"gradient without create_graph")


class BagFunction(torch.autograd.Function):
    """out = lookup(weight, indices, offsets, per_sample_weights).

    Backward returns the dense gradient of the array (small: the array is the
    compressed one), or, with a fused optimizer, updates the array in place and
    returns no gradient for it."""

    @staticmethod
    def forward(ctx, weight, indices, offsets, psw, lookup, keep=True):
        # keep: the run starts hashed here serve backward too (the caller
        # knows whether one will run: inside forward, grad mode is always off)
        keep = bool(keep) and ctx.needs_input_grad[0]
        out = plain_lookup(weight, indices, offsets, psw, lookup, return_saved=keep)
        out, ctx.bag_saved = out if keep else (out, None)
        ctx.lookup, ctx.steps = lookup, lookup.steps
        ctx.save_for_backward(weight, indices, offsets, psw)
        return as_tensor(out)

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward("hashemb embedding bag")
        weight, indices, offsets, psw = ctx.saved_tensors
        lk = ctx.lookup
        with device_context(weight):
            # (a CPU gradient goes as it lies: the backward copies only a
            # layout its kernels cannot read, V.as_grad)
            g = as_any_array(grad.contiguous() if grad.is_cuda else grad, "grad_output")
            idx, w, off = as_any_array(indices, "input"), as_any_array(weight, "weight"), \
                as_any_array(offsets, "offsets")
            gw = gp = None
            wants_psw = psw is not None and ctx.needs_input_grad[3]
            if lk.steps != ctx.steps:
                if wants_psw or lk.mode == "max":
                    raise_stale("per-sample weights' gradient" if wants_psw else
                                "max-mode gradient (its argmax)")
                if ctx.needs_input_grad[0] and not isinstance(lk.optimizer, SGD):
                    # Adagrad's rule is not linear in the gradient: a step per call
                    # is not the one step on their summed gradient (0.045 apart at
                    # lr 0.1); SGD's two steps are that one step
                    raise_called_twice("a fused Adagrad step per call is not one step on "
                                       "the calls' summed gradient")
            if wants_psw:                                       # before a fused update
                gp = as_tensor(lk.psw_grad(g, idx, w, off))
            # (a frozen weight, requires_grad False, is left alone even with a
            # fused optimizer: it moved when per-sample weights took a gradient)
            if ctx.needs_input_grad[0]:
                res = lk.backward(g, idx, w, off, as_any_array(psw, "per_sample_weights"),
                                  ctx.bag_saved)
                gw = None if res is None else as_tensor(res)
                lk.steps += res is None
        return gw, None, None, gp, None, None
