"""Vector code Numba does not write by itself, as ``@intrinsic`` functions: what the screens of the
nearest-code search (nearest_amx.py, nearest_vnni.py, screen.py) need beyond plain loops.

- ``target_features()``: the CPU features Numba compiles for, so a screen runs only where its
  instructions exist.
- Reading a 32 x 32 block of float32 scores (rows of 128 bytes): which rows have a score within a
  limit (``rows_within``), which codes of a row do (``lanes_within``), a row's lowest score
  (``row_minimum``), and the lowest set bit of a mask (``lowest_bit``); a bit cast from uint32 to
  float32 (``float32_from_bits``).
- ``dot_s16_block``: AVX-512 VNNI's int16 products (``vpdpwssd``) for up to 32 rows x 32 codes at a
  time, exact in int32.

Addresses are plain integers (``array.ctypes.data``), strides are in bytes.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()


def target_features():
    """The CPU features Numba compiles for, as LLVM names them (``"+avx512vnni"``, ``"+amx-bf16"``): the
    host's, or the ones ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` name (benchmarks/as_avx2.sh holds
    Numba to Haswell that way; a named CPU without a feature list counts as having none)."""
    from numba.core import config
    if config.CPU_FEATURES is not None:
        return set(config.CPU_FEATURES.split(","))
    if config.CPU_NAME not in (None, "host"):
        return set()
    try:
        from llvmlite import binding
        return set(binding.get_host_cpu_features().flatten().split(","))
    except Exception:             # an llvmlite that cannot say: no screen
        return set()


def _splat(builder, value, kind):
    """A vector of ``kind`` with ``value`` in every lane."""
    vector = builder.insert_element(ir.Constant(kind, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(_I32, kind.count), [0] * kind.count))


def _at(builder, address, offset, kind):
    """A pointer to ``kind`` at ``address + offset`` (both i64 values)."""
    return builder.inttoptr(builder.add(address, offset), ir.PointerType(kind))


# ---------------------------------------------------------------- reading a block of scores
# A screen's scores come back through memory, 32 float32 a row. Numba's own loops over 32 codes are unrolled
# by LLVM before its vectoriser sees them and then stay scalar (four cycles per score for a running
# minimum), so the three reads a screen needs are written out in vector IR here.
_F32X16 = ir.VectorType(_F32, 16)


def _load(builder, address, byte_offset, kind):
    pointer = builder.inttoptr(builder.add(address, ir.Constant(_I64, byte_offset)), ir.PointerType(kind))
    return builder.load(pointer, align=4)


def _row_scores(builder, scores_at, byte_offset, norms):
    """The two registers ``scores[c] + norms[c]`` of one row (c < 16, c >= 16)."""
    return [builder.fadd(_load(builder, scores_at, byte_offset + 64 * h, _F32X16), norms[h]) for h in (0, 1)]


def _norms(builder, norms_at):
    return [_load(builder, norms_at, 64 * h, _F32X16) for h in (0, 1)]


def _at_most(builder, row, limit):
    """A 32-bit mask of the lanes of ``row`` (two registers) that are <= ``limit`` (a float32 value)."""
    splat = _splat(builder, limit, _F32X16)
    halves = [builder.zext(builder.bitcast(builder.fcmp_ordered("<=", half, splat), ir.IntType(16)), _I32)
              for half in row]
    return builder.or_(halves[0], builder.shl(halves[1], ir.Constant(_I32, 16)))


@intrinsic
def rows_within(typingctx, scores, norms, limits):
    """A 32-bit mask: bit r is set when some ``scores[r, c] + norms[c] <= limits[r]`` (c < 32).

    ``scores``: the address of a 32 x 32 float32 block (rows of 128 bytes), ``norms``: of 32 float32,
    ``limits``: of 32 float32.
    """
    def codegen(context, builder, signature, args):
        scores_at, norms_at, limits_at = args
        norms = _norms(builder, norms_at)
        mask = ir.Constant(_I32, 0)
        for r in range(32):
            lanes = _at_most(builder, _row_scores(builder, scores_at, 128 * r, norms),
                             _load(builder, limits_at, 4 * r, _F32))
            hit = builder.zext(builder.icmp_unsigned("!=", lanes, ir.Constant(_I32, 0)), _I32)
            mask = builder.or_(mask, builder.shl(hit, ir.Constant(_I32, r)))
        return mask
    return types.uint32(types.intp, types.intp, types.intp), codegen


@intrinsic
def lanes_within(typingctx, scores, norms, limit):
    """A 32-bit mask: bit c is set when ``scores[c] + norms[c] <= limit`` (one row of 32 float32)."""
    def codegen(context, builder, signature, args):
        scores_at, norms_at, limit = args
        return _at_most(builder, _row_scores(builder, scores_at, 0, _norms(builder, norms_at)), limit)
    return types.uint32(types.intp, types.intp, types.float32), codegen


@intrinsic
def row_minimum(typingctx, scores, norms):
    """min over c < 32 of ``scores[c] + norms[c]`` (float32; no NaN may occur)."""
    def codegen(context, builder, signature, args):
        low, high = _row_scores(builder, args[0], 0, _norms(builder, args[1]))
        lower = builder.select(builder.fcmp_ordered("<", low, high), low, high)
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32X16]),
                                                "llvm.vector.reduce.fmin.v16f32")
        return builder.call(reduce, [lower])
    return types.float32(types.intp, types.intp), codegen


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 whose bits are the uint32 ``bits`` (a bit cast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _F32)
    return types.float32(types.uint32), codegen


@intrinsic
def lowest_bit(typingctx, mask):
    """The index of the lowest set bit of a nonzero uint32 (``cttz``)."""
    def codegen(context, builder, signature, args):
        cttz = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_I32, ir.IntType(1)]),
                                              "llvm.cttz.i32")
        return builder.zext(builder.call(cttz, [args[0], ir.Constant(ir.IntType(1), 1)]), _I64)
    return types.int64(types.uint32), codegen


# ---------------------------------------------------------------- AVX-512 VNNI's int16 products
_V16I32, _V16F32 = ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)
BLOCK_ROWS = 8                    # rows whose sums ``dot_s16_block`` holds in registers at once


@intrinsic
def dot_s16_block(typingctx, rows_at, row_bytes, rows, codes_at, pairs, scales_at, out_at):
    """``out[r, c] = scales[r] * float32(sum_d q[r, d] e[c, d])`` for r < ``rows`` rounded up to a multiple
    of ``BLOCK_ROWS`` (at most 32; the rows past ``rows`` must be readable) and 32 codes c; the sums are
    exact in int32 (``vpdpwssd``: two int16 products added to an int32 lane, wrapping on overflow, so the
    caller keeps ``D max|q| max|e| < 2^31``: nearest_vnni.py).

    ``rows_at``: int16 rows q, ``row_bytes`` apart, ``2 * pairs`` features each. ``codes_at``: int16 codes
    of one block of 32, 128 bytes per pair of features: ``[p][h][c][s]``, code ``16 h + c``, feature
    ``2 p + s``. ``scales_at``: float32 per row; ``out_at``: 32 x 32 float32 (rows of 128 bytes).

    Per pair of features: two registers of codes, and for each of ``BLOCK_ROWS`` rows the row's pair
    broadcast to every lane and two ``vpdpwssd`` into the row's two registers of sums.
    """
    def codegen(context, builder, signature, args):
        rows_at, row_bytes, rows, codes_at, pairs, scales_at, out_at = args
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16I32, [_V16I32] * 3),
                                             "llvm.x86.avx512.vpdpwssd.512")
        sums = [[cgutils.alloca_once(builder, _V16I32) for _ in range(2)] for _ in range(BLOCK_ROWS)]
        step = ir.Constant(_I64, BLOCK_ROWS)
        quads = builder.udiv(builder.add(rows, ir.Constant(_I64, BLOCK_ROWS - 1)), step)
        with cgutils.for_range(builder, quads) as quad_loop:
            first = builder.mul(quad_loop.index, step)
            row_at = [builder.add(rows_at, builder.mul(builder.add(first, ir.Constant(_I64, r)), row_bytes))
                      for r in range(BLOCK_ROWS)]
            for pair in sums:
                for h in (0, 1):
                    builder.store(ir.Constant(_V16I32, [0] * 16), pair[h])
            with cgutils.for_range(builder, pairs) as pair_loop:
                p = pair_loop.index
                block_at = builder.add(codes_at, builder.mul(p, ir.Constant(_I64, 128)))
                codes = [builder.load(_at(builder, block_at, ir.Constant(_I64, 64 * h), _V16I32), align=4)
                         for h in (0, 1)]
                for r in range(BLOCK_ROWS):
                    word = builder.load(_at(builder, row_at[r], builder.mul(p, ir.Constant(_I64, 4)), _I32), align=4)
                    row = _splat(builder, word, _V16I32)
                    for h in (0, 1):
                        builder.store(builder.call(dot, [builder.load(sums[r][h]), row, codes[h]]), sums[r][h])
            for r in range(BLOCK_ROWS):
                row = builder.add(first, ir.Constant(_I64, r))
                scale = _splat(builder, builder.load(_at(builder, scales_at, builder.mul(row, ir.Constant(_I64, 4)),
                                                         _F32)), _V16F32)
                out_row = builder.add(out_at, builder.mul(row, ir.Constant(_I64, 128)))
                for h in (0, 1):
                    value = builder.fmul(builder.sitofp(builder.load(sums[r][h]), _V16F32), scale)
                    builder.store(value, _at(builder, out_row, ir.Constant(_I64, 64 * h), _V16F32), align=4)
        return context.get_dummy_value()
    return types.none(*([types.intp] * 7)), codegen
