"""Argument checks shared by every public function and backend.

Every error names the argument and says "expected ..., got ...". Kernels assume
what passes here: nothing past this module reads or writes out of bounds.
"""
import argparse
import math
import numbers
import os
from collections import namedtuple

import numpy as np

from ._backend import fork_safe_lock, is_cupy

MODES = ("sum", "mean", "max")          # codes 0, 1, 2 in the kernels
_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_U64 = 1 << 64

Bags = namedtuple("Bags", "idx off psw B T mode has_pad pad")


def _dt(dtype):
    """A dtype as the errors name it, with how to fix a byte-swapped one
    (``>i8`` reads like int64 but is not what the kernels take)."""
    dtype = np.dtype(dtype)
    if dtype.isnative:
        return str(dtype)
    return (f"{dtype.str} ({dtype.newbyteorder('=').name} in non-native byte order: "
            f"convert with .astype({dtype.newbyteorder('=').name!r}))")


def _desc(x):
    if isinstance(x, np.ndarray):
        return f"array of dtype {x.dtype} and shape {x.shape}"
    return f"{type(x).__name__} {x!r}" if np.isscalar(x) or x is None else type(x).__name__


def check_int(value, name, *, lo=None, hi=None):
    """An integer (bool excluded) with lo <= value < hi."""
    if type(value) is not int and (isinstance(value, (bool, np.bool_))
                                   or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name}: expected an integer, got {_desc(value)}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value >= hi):
        rng = f"{'' if lo is None else f'{lo} <= '}{name}{'' if hi is None else f' < {hi}'}"
        raise ValueError(f"{name}: expected {rng}, got {value}")
    return value


def check_flag(value, name):
    """A bool (NumPy's, or an integer 0 or 1): a string such as ``"no"`` would
    otherwise read as True."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral)
                                                and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name}: expected True or False, got {_desc(value)}")


def check_deterministic(value):
    """A backward's ``deterministic``: a flag, or None for the GPU options'
    default (``he.set_gpu_options``)."""
    return None if value is None else check_flag(value, "deterministic")


def check_positive_int(value, name, upper=None):
    return check_int(value, name, lo=1, hi=upper)


def check_like(like):
    """Whether ``like`` (None, a NumPy or a CuPy array: where new arrays go)
    is a CuPy array; TypeError naming it for anything else."""
    if is_cupy(like):
        return True
    if like is not None and not isinstance(like, np.ndarray):
        raise TypeError(f"like: expected a cupy.ndarray or numpy.ndarray, got {_desc(like)}")
    return False


def check_seed(seed):
    return check_int(seed, "seed", lo=0, hi=_U64)


def check_key(value, name):
    """Any 64-bit integer, signed or unsigned, as its unsigned bit pattern."""
    return check_int(value, name, lo=-(1 << 63), hi=_U64) % _U64


def check_float(value, name, *, positive=False, nonneg=False):
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value.item()            # a 0-d array is its number (np.float64(x) is one)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {_desc(value)}")
    value = float(value)
    if not np.isfinite(value) or (positive and value <= 0) or (nonneg and value < 0):
        want = "a finite number" + (" > 0" if positive else " >= 0" if nonneg else "")
        raise ValueError(f"{name}: expected {want}, got {value}")
    return value


def check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(map(repr, MODES))}, got {mode!r}")
    return MODES.index(mode)


def _as_array(x, name):
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple, numbers.Number)):
        return np.asarray(x)
    raise TypeError(f"{name}: expected a numpy.ndarray, got {_desc(x)}")


def _contiguous(x):
    """x, C-contiguous, of its own shape (np.ascontiguousarray makes a 0-d
    array 1-d: one token's output then had an extra axis)."""
    return x if x.flags.c_contiguous else np.array(x, order="C")


def as_keys(x, name):
    """Integer tokens of any 64-bit type (uint64 kept as its bit pattern)."""
    x = _as_array(x, name)
    if x.dtype == np.uint64:
        x = x.view(np.int64)
    if x.dtype not in _INDEX_DTYPES:
        if x.size == 0 and x.dtype == np.float64:   # np.asarray([]) is float64
            x = x.astype(np.int64)
        else:
            raise TypeError(f"{name}: expected an int32, int64 or uint64 array, got dtype {_dt(x.dtype)}")
    return _contiguous(x)


def float_dtype(x, name):
    """The dtype as_float gives x (a float of the kernels', else float32),
    nothing copied."""
    x = _as_array(x, name)
    if x.dtype.kind != "f" and format16(x.dtype) != 1:     # (bfloat16 is kind "V")
        raise TypeError(f"{name}: expected a floating-point array, got dtype {_dt(x.dtype)}")
    return x.dtype if x.dtype in _FLOAT_DTYPES else np.dtype(np.float32)


def as_float(x, name, dtype=None):
    own = float_dtype(x, name)
    return np.ascontiguousarray(x, dtype=dtype or own)


_Scheme = None      # hashemb.schemes.Scheme (which imports this module)


def check_scheme(scheme):
    global _Scheme
    if _Scheme is None:
        from .schemes import Scheme
        _Scheme = Scheme
    if not isinstance(scheme, _Scheme):
        raise TypeError(f"scheme: expected a hashemb scheme (RobeZ, HashedNet, FullTable, ...), "
                        f"got {_desc(scheme)}")
    return scheme


_HALF = np.dtype(np.float16)
_F32 = np.dtype(np.float32)


def format16(dtype):
    """The 16-bit storage format of ``dtype``, as the kernels' flag: 0 for
    float16, 1 for bfloat16 (ml_dtypes' dtype, known by its name so that
    hashemb never imports ml_dtypes), None for any other dtype."""
    if dtype == _HALF:
        return 0
    if dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16":
        return 1
    return None


def is16(dtype):
    """Whether ``dtype`` is 16-bit storage (float16 or bfloat16)."""
    return format16(dtype) is not None


def compute_dtype(dtype):
    """The dtype a kernel computes in for an array of ``dtype``: float16 and
    bfloat16 are storage only, pooled and scattered in float32."""
    return _F32 if is16(dtype) else dtype


def storage_dtype(dtype, storage=False):
    """A weight's dtype, checked: float32 or float64, or float16 / bfloat16
    where the caller takes 16-bit storage (``storage``: the bag functions);
    returns the dtype the kernels compute in (float32 for 16-bit storage).
    The rule of NumPy and CuPy weights alike."""
    if dtype in _FLOAT_DTYPES:
        return dtype
    if storage and is16(dtype):
        return _F32
    want = "float16, bfloat16, float32 or float64" if storage else "float32 or float64"
    raise TypeError(f"weight: expected a {want} array, got dtype {_dt(dtype)}")


def weight_dtype(weight, storage=False):
    """storage_dtype of a NumPy weight."""
    if not isinstance(weight, np.ndarray):
        raise TypeError(f"weight: expected a numpy.ndarray, got {_desc(weight)}")
    return storage_dtype(weight.dtype, storage)


def as_weight(weight, scheme, *, writable=False, storage=False):
    """The array as a flat contiguous vector of scheme.size floats. writable=True:
    a view of the caller's memory (in-place updates), so it must be C-contiguous.
    storage: float16 and bfloat16 accepted (see weight_dtype)."""
    weight_dtype(weight, storage)
    if weight.shape not in ((scheme.size,), scheme.weight_shape):
        want = " or ".join(sorted({str((scheme.size,)), str(scheme.weight_shape)}))
        raise ValueError(f"weight: expected shape {want}, got {weight.shape}")
    if writable:
        if not weight.flags.c_contiguous or not weight.flags.writeable:
            raise ValueError("weight: expected a writeable C-contiguous array for an in-place "
                             "optimizer update, got a non-contiguous or read-only one")
        return weight.reshape(-1)
    return np.ascontiguousarray(weight).reshape(-1)


def check_table(table, scheme, name="table"):
    # the scheme's own count in the message where it has one (not 2**61)
    return check_int(table, name, lo=0, hi=scheme.num_tables or 1 << 61)


def check_backward_weight(weight, mode, optimizer):
    """Backward needs the array for an optimizer step and for max mode."""
    if weight is None and (mode == "max" or optimizer is not None):
        why = "an optimizer updates it" if optimizer is not None else \
            "mode='max' routes each gradient to the maximum"
        raise ValueError(f"weight: expected the array ({why}), got None")


def check_2d(shape, offsets, T, psw_shape, desc=None):
    """2-D (B, N) indices: no offsets; (B, T) for many tables; weights shaped alike."""
    if offsets is not None:
        raise ValueError(f"offsets: expected None when indices is 2-D (B, N), "
                         f"got {(desc or _desc)(offsets)}")
    if T > 1 and shape[1] != T:
        raise ValueError(f"indices: expected shape (B, num_tables={T}) for 2-D input, "
                         f"got {shape}")
    if psw_shape is not None and psw_shape != shape:
        raise ValueError(f"per_sample_weights: expected shape {shape} (as indices), "
                         f"got {psw_shape}")


def check_offsets_array(off, T, include_last_offset):
    """1-D int32/int64 offsets, at least one when the last one is included."""
    if off.dtype not in _INDEX_DTYPES:
        raise TypeError(f"offsets: expected an int32 or int64 array, got dtype {_dt(off.dtype)}")
    if off.ndim != 1:
        raise ValueError(f"offsets: expected a 1-D array, got shape {off.shape}")
    if (T > 1 or include_last_offset) and off.shape[0] < 1:
        raise ValueError("offsets: expected at least one offset (B + 1 with the last), got none")


def check_offsets_length(n, T):
    """T*B+1 offsets (feature-major): B."""
    if (n - 1) % T:
        raise ValueError(f"offsets: expected length num_tables * B + 1 = {T} * B + 1, got {n}")
    return (n - 1) // T


def check_psw(mode, n, psw=None):
    """Per-sample weights: mode sum only; once flat, one per index."""
    if mode != 0:
        raise ValueError(f"per_sample_weights: expected None with mode={MODES[mode]!r} "
                         "(only mode='sum' takes weights), got an array")
    if psw is not None and psw.shape[0] != n:
        raise ValueError(f"per_sample_weights: expected {n} weights (one per "
                         f"index), got {psw.shape[0]}")


def padding(padding_idx, scheme, T, table0):
    """(has_pad, pad): a FullTable's negative padding index counts from the end."""
    if padding_idx is None:
        return False, 0
    # any 64-bit token, signed or not: a uint64 one >= 2**63 as the int64 bits
    # the kernels see it as
    pad = check_int(padding_idx, "padding_idx", lo=-(1 << 63), hi=1 << 64)
    if scheme.table_sizes is not None and T == 1:
        n = scheme.table_sizes[table0]
        return True, check_int(pad, "padding_idx", lo=-n, hi=n) % n
    return True, pad - (1 << 64) if pad >= 1 << 63 else pad


_EVEN = {}
fork_safe_lock(globals(), "_EVEN_LOCK")


def _even_offsets(count, step):
    """The offsets 0, step, 2 step, ... (count values) of 2-D input, read
    only. The two latest are kept (up to 2M values each): a training loop
    asks for the same ones every call, and making them costs about 120 us
    at 16384 x 26."""
    key = (count, step)
    off = _EVEN.get(key)
    if off is None:
        off = np.arange(0, count * step, step, dtype=np.int64)
        off.flags.writeable = False
        if count <= 1 << 21:
            with _EVEN_LOCK:
                while len(_EVEN) >= 2:
                    _EVEN.pop(next(iter(_EVEN)))
                _EVEN[key] = off
    return off


def bags(k, indices, offsets, per_sample_weights, *, scheme, mode, dtype, table0=0,
         num_tables=1, include_last_offset=False, padding_idx=None):
    """Normalise a bag batch: flat contiguous indices, int64 offsets of length
    T*B+1, per-sample weights of the compute dtype (empty: none)."""
    mode = check_mode(mode)
    T = num_tables
    idx = as_keys(indices, "indices")
    if idx.ndim == 2:
        psw = None if per_sample_weights is None else _as_array(per_sample_weights,
                                                                  "per_sample_weights")
        check_2d(idx.shape, offsets, T, None if psw is None else psw.shape)
        if T == 1:
            B, N = idx.shape
            off = _even_offsets(B + 1, N) if N else np.zeros(B + 1, np.int64)
            flat = idx.reshape(-1)
        else:
            B = idx.shape[0]
            off = _even_offsets(T * B + 1, 1)
            if B == 1:                              # one sample is feature-major as it is
                flat = idx.reshape(-1)
            else:
                flat = np.empty(B * T, idx.dtype)   # feature-major: a blocked parallel copy,
                k.feature_major(idx, flat)          # 2.9x NumPy's strided one at 16384 x 26
        if psw is not None:
            per_sample_weights = psw if T == 1 else psw.T
        idx = flat
    elif idx.ndim == 1:
        if offsets is None:
            raise ValueError("offsets: expected a 1-D int32/int64 array when indices is 1-D, got None")
        off = _as_array(offsets, "offsets")
        check_offsets_array(off, T, include_last_offset)
        off = np.ascontiguousarray(off, dtype=np.int64)
        appended = T == 1 and not include_last_offset
        B = check_offsets_length(off.shape[0] + appended, T)
    else:
        raise ValueError(f"indices: expected a 1-D or 2-D array, got shape {idx.shape}")

    if per_sample_weights is None:
        psw = np.empty(0, dtype)
    else:
        check_psw(mode, idx.shape[0])
        psw = as_float(per_sample_weights, "per_sample_weights", dtype).reshape(-1)
        check_psw(mode, idx.shape[0], psw)

    if offsets is not None:         # the caller's values (in the GPU's order of checks)
        check_offsets_values(k, off, idx.shape[0])
        if appended:
            off = np.concatenate([off, np.array([idx.shape[0]], np.int64)])
    has_pad, pad = padding(padding_idx, scheme, T, table0)
    check_indices(k, scheme, idx, off, B, T, table0, has_pad, pad, is_uint64(indices))
    return Bags(idx, off, psw, B, T, mode, has_pad, pad)


def check_offsets_values(k, off, n):
    """ValueError for the caller's int64 host offsets ``off`` (before any
    appended len(indices)) unless they start at 0, do not decrease and stay
    <= n (the CPU's check; the GPU's names its finds through it)."""
    bad = k.offsets_problem(off, n)
    if bad == 0:
        raise ValueError(f"offsets[0]: expected 0, got {off[0]}")
    if bad > 0 and off[bad - 1] > n:
        # a value past the end, then a smaller one: name the first (the
        # torch modules append len(input), which is no value of the caller's)
        bad -= 1
    if bad > 0 and off[bad] <= n:
        raise ValueError(f"offsets: expected non-decreasing values, got offsets[{bad}]="
                         f"{off[bad]} < offsets[{bad - 1}]={off[bad - 1]}")
    if bad > 0:
        raise ValueError(f"offsets: expected values <= len(indices) = {n}, got {off[bad]}")


def check_indices(k, scheme, idx, off, B, T, table0, has_pad=False, pad=0, unsigned=False):
    """IndexError for the first token outside its sized table (padding skipped);
    bag t*B+b of the feature-major offsets belongs to table table0 + t.
    ``unsigned``: the caller's tokens were uint64 (named as such)."""
    bounds = scheme._bounds(table0, T)
    if bounds is None or not idx.shape[0]:
        return
    bad = k.index_problem(idx, off, B, T, bounds, has_pad, pad)
    if bad >= 0:
        t = int(np.searchsorted(off, bad, side="right") - 1) // max(B, 1)
        raise IndexError(index_message(bad, bounds[t], table0 + t, int(idx[bad]), unsigned))


def index_message(pos, bound, table, value, unsigned=False):
    """The message of a token outside its table, bound and value as the
    caller knows them (a bound of -2**63 is 2**63; a uint64 token >= 2**63
    was shown as the negative int64 it is viewed as)."""
    return (f"indices[{pos}]: expected 0 <= index < {int(bound) % (1 << 64)} "
            f"(table {table}), got {value % (1 << 64) if unsigned else value}")


def is_uint64(x):
    return getattr(x, "dtype", None) == np.uint64


def as_grad(grad_output, shape, dtype, rows=False):
    """grad_output as a C-contiguous float array of ``shape`` and ``dtype``,
    copied only where it is not one. ``rows``: a 2-D array whose rows are
    each contiguous, in order, and apart by any stride (a column slice of a
    wider gradient, as a DLRM's interaction hands back), or one row repeated
    (stride 0: a broadcast row, a sum's gradient) is taken as it is; one
    value repeated (a sum's gradient in torch) becomes one row at stride 0,
    not a copy of every row (a 3.4 MB copy faulted in fresh pages each step)."""
    g = grad_output
    if rows and isinstance(g, np.ndarray) and g.shape == shape and len(shape) == 2:
        if g.strides[0] == 0 and (g.strides[1] != g.itemsize or g.dtype != dtype):
            g = np.broadcast_to(as_float(g[:1], "grad_output", dtype), shape)
        step, item = g.strides[0], g.itemsize
        if g.dtype == dtype and g.strides[1] == item and step % item == 0 and (
                step == 0 or step >= item * shape[1]):
            return g
    g = as_float(grad_output, "grad_output", dtype)
    if g.shape != shape:
        raise ValueError(f"grad_output: expected shape {shape}, got {g.shape}")
    return g


def packed_layout(sizes, dims):
    """(base, dims, cols, sizes) int64 arrays and the flat size of T tables of
    ``sizes[t]`` rows by ``dims[t]`` floats packed one after another."""
    if isinstance(sizes, numbers.Integral):
        sizes = [sizes]
    if isinstance(dims, numbers.Integral):
        dims = [dims]
    sizes = [check_positive_int(n, "sizes", upper=1 << 61) for n in sizes]
    dims = [check_positive_int(d, "dims", upper=1 << 20) for d in dims]
    if not sizes:
        raise ValueError("sizes: expected at least one table, got none")
    if len(dims) != len(sizes):
        raise ValueError(f"dims: expected {len(sizes)} widths (one per table), got {len(dims)}")
    numel = np.array(sizes, object) * np.array(dims, object)
    if sum(numel) >= 1 << 61:
        raise ValueError(f"sizes: expected sum(sizes * dims) < 2**61, got {sum(numel)}")
    base = np.concatenate([[0], np.cumsum(numel)[:-1]]).astype(np.int64)
    cols = np.concatenate([[0], np.cumsum(dims)[:-1]]).astype(np.int64)
    return (base, np.array(dims, np.int64), cols, np.array(sizes, np.int64)), int(sum(numel))


def index_array(indices, name="indices"):
    """int32/int64 indices as a C-contiguous array (an empty list reads as int64)."""
    idx = _as_array(indices, name)
    if idx.dtype not in (np.int32, np.int64):
        if idx.size == 0 and idx.dtype == np.float64:
            return idx.astype(np.int64)
        raise TypeError(f"{name}: expected an int32 or int64 array, got dtype {_dt(idx.dtype)}")
    return _contiguous(idx)


def check_table_columns(idx, T, name="indices"):
    """A multi-table lookup takes (B, T) indices, one column per table."""
    if idx.ndim != 2 or idx.shape[1] != T:
        raise ValueError(f"{name}: expected shape (B, {T}) (one column per table), "
                         f"got {tuple(idx.shape)}")


def index_error(indices, bad, sizes, name="indices"):
    """IndexError naming ``indices`` at flat position ``bad`` (a kernel's
    report), outside table ``bad % T`` of ``sizes[t]`` rows; NumPy or CuPy."""
    T = len(sizes)
    t = bad % T
    pos = np.unravel_index(bad, indices.shape)
    where = "" if T == 1 else f" (table {t})"
    return IndexError(f"{name}[{', '.join(map(str, pos))}]: expected 0 <= index < "
                      f"{sizes[t]}{where}, got {int(indices.reshape(-1)[bad])}")


def check_bag_saved(saved, cls, scheme, table0, T, B, n, mode, device, padding=None):
    """The starts of a BagSaved made by the forward of these inputs on this
    backend (device: whether the other arrays are on the GPU; padding: the
    padding token or None), or None."""
    if saved is None:
        return None
    if not isinstance(saved, cls):
        raise TypeError(f"saved: expected a BagSaved from return_saved=True, got {_desc(saved)}")
    if saved.device != device:
        where = "the device" if device else "the host"
        raise TypeError(f"saved: expected a BagSaved of a forward on {where} (as the other "
                        f"arguments), got one from the other backend")
    if saved.padding != padding:
        # (the device keeps a padding entry's place and leaves its starts
        # unwritten: a backward without the padding read them)
        raise ValueError(f"saved: expected the forward of these inputs (padding token "
                         f"{padding}), got one of padding token {saved.padding}")
    here = (scheme, table0, T, B, n, mode)
    there = (saved.scheme, saved.table0, saved.T, saved.B, saved.n, saved.mode)
    if any(a is not b and a != b for a, b in zip(here, there)):
        raise ValueError(f"saved: expected the forward of these inputs ({B} bags, {n} "
                         f"indices, tables {table0}..{table0 + T - 1}, mode "
                         f"{MODES[mode]!r}, this scheme), got one of {saved.B} bags, "
                         f"{saved.n} indices, tables {saved.table0}..{saved.table0 + saved.T - 1}, "
                         f"mode {MODES[saved.mode]!r}"
                         + ("" if saved.scheme is scheme else ", another scheme"))
    return saved.starts


def cli_number(kind, low=0.0, high=math.inf, closed=False):
    """An argparse type of the command lines: a finite `kind` in (low, high]
    ([low, high] when closed), else argparse's error naming the flag (a 0
    would otherwise read as 'the default' where a CLI writes `x or default`,
    and a negative count run nothing)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not (math.isfinite(v) and (v >= low if closed else v > low) and v <= high):
            lo = f"[{low:g}" if closed else f"({low:g}"
            hi = "inf)" if high == math.inf else f"{high:{'d' if kind is int else 'g'}}]"
            raise argparse.ArgumentTypeError(f"expected a value in {lo}, {hi}, got {text}")
        return v
    return parse


def cli_refusal(parser, error, flags):
    """Exit through ``parser.error`` with a library ``error`` ("name: ...")
    said as the error of the flag ``flags[name]`` (a traceback otherwise)."""
    name, _, rest = str(error).partition(": ")
    flag = flags.get(name)
    parser.error(f"argument {flag}: {rest}" if flag else str(error))


def cli_ints(text):
    """An argparse type: comma-separated integers > 0, at least one."""
    parse = cli_number(int)
    vals = [parse(c.strip()) for c in text.split(",") if c.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers > 0, got {text!r}")
    return vals


def cli_numbers(text):
    """An argparse type: comma-separated numbers > 0 ('' for none)."""
    parse = cli_number(float)
    return [parse(c.strip()) for c in text.split(",") if c.strip()]


def cli_folder(parser, folder, flag="--out"):
    """A command line's output folder, made (with its parents) and written
    to now, before any work: a path under a regular file or a read-only
    folder is argparse's error naming ``flag``, not a traceback after the
    run."""
    folder = os.fspath(folder) or "."
    try:
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise NotADirectoryError(0, "it is a file, not a folder")
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-check.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        parser.error(f"argument {flag}: cannot write the results into {folder!r}: "
                     f"{e.strerror or e}")
