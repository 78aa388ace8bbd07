"""Streaming reader of the Criteo TSV format: ``label, I1..I13, C1..C26``.

Categorical tokens are hashed to 64-bit ids on the fly (SplitMix64 of the hex
value + 1 mod 2**64, a bijection, so distinct tokens never collide; a missing
token is id 0, which it shares with the one token ``ffffffffffffffff``:
2**64 tokens and a missing one do not fit in 64 bits): no vocabulary pass is
needed, and the hashed schemes take the ids as they are. Dense values get DLRM's transform ``log1p(max(x, 0))`` (missing = 0).
"""
import gzip

import numpy as np

from .. import _validate as V
from .synthetic import NUM_DENSE, Batch, _mix

NUM_CATS = 26
_FIELDS = 1 + NUM_DENSE + NUM_CATS
_HEX = frozenset("0123456789abcdefABCDEF")
_MASK = (1 << 64) - 1


def token_id(hex_token):
    """The 64-bit id (as int64) of one Criteo token string (``""`` -> 0).

    Examples
    --------
    >>> from hashemb.data.criteo import token_id
    >>> token_id(""), token_id("68fd1e64") == token_id("68FD1E64")
    (0, True)
    """
    if hex_token == "":
        return 0
    v = np.array([(int(hex_token, 16) + 1) & _MASK], np.uint64)
    return int(_mix(v).view(np.int64)[0])


class CriteoTSV:
    """Read a Criteo TSV file (or any iterable of lines) in batches.

    Parameters
    ----------
    source : str, path or iterable of str
        File name (plain or gzip-compressed), or lines (e.g. an open file).
    on_bad : {"raise", "skip"}
        A malformed row (not 40 tab-separated fields, a label other than 0/1,
        a non-integer dense value, a token that is not hex of at most 16
        digits) raises ValueError naming the line number, or is skipped and
        counted in :attr:`skipped`.

    Examples
    --------
    >>> from hashemb.data import CriteoTSV
    >>> row = "1\\t" + "\\t".join(["3"] * 13) + "\\t" + "\\t".join(["a1b2"] * 26)
    >>> b = next(CriteoTSV([row, row]).batches(10))
    >>> b.dense.shape, b.cats.shape, b.labels.tolist()
    ((2, 13), (2, 26), [1.0, 1.0])
    """

    def __init__(self, source, on_bad="raise"):
        if on_bad not in ("raise", "skip"):
            raise ValueError(f"on_bad: expected 'raise' or 'skip', got {on_bad!r}")
        self.source, self.on_bad = source, on_bad
        self.skipped = 0
        self.rows = 0

    def _lines(self):
        """The source's lines: a file's as bytes (gzip-compressed ones, by
        their magic number, decompressed), decoded where a bad line can be
        skipped."""
        if isinstance(self.source, (str, bytes)) or hasattr(self.source, "__fspath__"):
            # opened once and peeked: a pipe (`<(zcat day_0.gz)`) cannot be reopened
            with open(self.source, "rb") as f:
                if f.peek(2)[:2] == b"\x1f\x8b":
                    with gzip.GzipFile(fileobj=f) as g:
                        yield from g
                else:
                    yield from f
        else:
            # a plain loop, not `yield from`: a pass that stops early (a
            # limit, an abandoned batches()) closes this generator, and
            # `yield from` would close the caller's file or generator with it
            for line in self.source:
                yield line

    @staticmethod
    def _parse(line):
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != _FIELDS:
            raise ValueError(f"expected {_FIELDS} tab-separated fields, got {len(parts)}")
        if parts[0] not in ("0", "1"):
            raise ValueError(f"label: expected 0 or 1, got {parts[0]!r}")
        dense = [int(v) if v else 0 for v in parts[1:1 + NUM_DENSE]]
        for k, v in enumerate(dense, 1):
            if not -(1 << 63) <= v < 1 << 63:
                raise ValueError(f"I{k}: expected a 64-bit integer, got one of "
                                 f"{len(str(abs(v)))} digits")
        cats = []
        for v in parts[1 + NUM_DENSE:]:
            if not v:
                cats.append(0)
                continue
            if len(v) > 16 or not _HEX.issuperset(v):
                raise ValueError(f"token: expected at most 16 hex digits, got {v!r}")
            cats.append((int(v, 16) + 1) & _MASK)
        return int(parts[0]), dense, cats

    def batches(self, batch_size=65536, limit=None):
        """Yield :data:`~hashemb.data.Batch` es of up to ``batch_size`` rows
        (``prob`` is None), at most ``limit`` rows in all. Each pass reads
        the source from its start (a file name, a list) or goes on where the
        last pass stopped (an open file, an iterator: ``read(limit=n)`` twice
        gives rows 1..n, then n+1..2n), and counts its own :attr:`rows` and
        :attr:`skipped`. Blank lines are passed over (a file's trailing one,
        concatenated files).

        Parameters
        ----------
        batch_size : int
            Rows per batch (the last may be shorter).
        limit : int, optional
            Rows to read at most (None: to the end).

        Yields
        ------
        Batch
            ``dense`` float32 (n, 13) of ``log1p(max(x, 0))``, ``cats`` int64
            (n, 26) token ids, ``labels`` float32 (n,), ``prob`` None.
        """
        batch_size = V.check_positive_int(batch_size, "batch_size")
        if limit is not None:
            limit = V.check_int(limit, "limit", lo=0)
        self.rows = self.skipped = 0
        labels, dense, cats = [], [], []
        lines = enumerate(self._lines(), 1)
        # the limit is tested before a line is pulled: one more pulled from
        # an iterator would be lost to the next pass
        while limit is None or self.rows < limit:
            lineno, line = next(lines, (0, None))
            if line is None:
                break
            try:
                if isinstance(line, bytes):
                    line = line.decode("utf-8")
                if not line.strip():
                    continue
                y, d, c = self._parse(line)
            except ValueError as e:     # UnicodeDecodeError too
                if self.on_bad == "raise":
                    raise ValueError(f"line {lineno}: {e}") from None
                self.skipped += 1
                continue
            labels.append(y)
            dense.append(d)
            cats.append(c)
            self.rows += 1
            if len(labels) == batch_size:
                yield self._batch(labels, dense, cats)
                labels, dense, cats = [], [], []
        if labels:
            yield self._batch(labels, dense, cats)

    @staticmethod
    def _batch(labels, dense, cats):
        d = np.log1p(np.maximum(np.array(dense, np.float64), 0)).astype(np.float32)
        raw = np.array(cats, np.uint64)
        ids = _mix(raw).view(np.int64)          # _mix(0) == 0: missing stays 0
        return Batch(d, ids, np.array(labels, np.float32), None)

    def read(self, limit=None):
        """All rows (up to ``limit``) as one Batch.

        Parameters
        ----------
        limit : int, optional
            Rows to read at most (None: every row).

        Returns
        -------
        Batch
            As :meth:`batches` yields, concatenated (``prob`` None); empty
            arrays of the right widths when no row is read.

        Examples
        --------
        >>> import numpy as np
        >>> from hashemb.data import CriteoTSV
        >>> from hashemb.data.criteo import token_id
        >>> row = "0\\t" + "\\t".join(["7"] * 13) + "\\t" + "\\t".join(["a1b2"] + [""] * 25)
        >>> b = CriteoTSV([row, "bad line", row], on_bad="skip").read()
        >>> b.cats.shape, b.labels.tolist()                 # the bad line skipped
        ((2, 26), [0.0, 0.0])
        >>> int(b.cats[0, 0]) == token_id("a1b2"), int(b.cats[0, 1])    # missing: id 0
        (True, 0)
        >>> bool(np.isclose(b.dense[0, 0], np.log1p(7)))
        True
        """
        parts = list(self.batches(limit=limit))
        if not parts:
            return Batch(np.zeros((0, NUM_DENSE), np.float32), np.zeros((0, NUM_CATS), np.int64),
                         np.zeros(0, np.float32), None)
        return Batch(*(np.concatenate(x) for x in zip(*[p[:3] for p in parts])), None)
