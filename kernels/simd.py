"""Vector code Numba does not write by itself, as ``@intrinsic`` functions: what the screens of the
nearest-code search (nearest_amx.py, nearest_int16.py, screen.py) need beyond plain loops.

- ``target_features()``: the CPU features Numba compiles for, so a screen runs only where its
  instructions exist.
- Reading a 32 x 32 block of float32 scores (rows of 128 bytes): which rows have a score within a
  limit (``rows_within``), which codes of a row do (``lanes_within``), a row's lowest score
  (``row_minimum``), and the lowest set bit of a mask (``lowest_bit``); a bit cast from uint32 to
  float32 (``float32_from_bits``).
- ``PRODUCTS``: int16 products for up to 32 rows x 32 codes at a time, exact in int32: VNNI's
  ``vpdpwssd`` in zmm registers (AVX-512 VNNI) or ymm ones (AVX-VNNI), else AVX2's ``vpmaddwd`` and
  ``vpaddd`` on ymm.

Addresses are plain integers (``array.ctypes.data``), strides are in bytes.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()


_features = None


def target_features():
    """The CPU features Numba compiles for, as LLVM names them (``"+avx512vnni"``, ``"+amx-bf16"``): the
    host's, or the ones ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` name (benchmarks/as_avx2.sh holds
    Numba to Haswell that way; a named CPU without a feature list counts as having none). Read once:
    Numba reads those variables when it is imported, and asking LLVM takes half a millisecond."""
    global _features
    if _features is None:
        _features = frozenset(_read_features())
    return _features


def _read_features():
    from numba.core import config
    if config.CPU_FEATURES is not None:
        return config.CPU_FEATURES.split(",")
    if config.CPU_NAME not in (None, "host"):
        return ()
    try:
        from llvmlite import binding
        return binding.get_host_cpu_features().flatten().split(",")
    except Exception:             # an llvmlite that cannot say: no screen
        return ()


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


# ---------------------------------------------------------------- int16 block products
BLOCK_ROWS = 8                    # the block products write their rows rounded up to a multiple of this


def _dot_s16_codegen(lanes, rows_a_pass, codes_a_pass, vnni):
    """The code of a block product (``named_block_product``'s doc) with registers of ``lanes`` int32:
    passes of ``rows_a_pass`` rows x ``codes_a_pass`` codes, each row's sums held in ``codes_a_pass / lanes``
    registers, over every part of the 32 codes and every ``rows_a_pass`` rows of each ``BLOCK_ROWS``.

    ``vnni``: the products and their sum in one ``vpdpwssd``; else (ymm only) ``vpmaddwd`` (two int16
    products added into an int32 lane, exact: no input is -32768) and ``vpaddd``, the same sums.
    """
    int_vector, float_vector = ir.VectorType(_I32, lanes), ir.VectorType(_F32, lanes)
    pair_vector = ir.VectorType(_I16, 2 * lanes)
    registers = codes_a_pass // lanes              # a row's sums
    parts = 32 // codes_a_pass                     # passes over the codes

    def add_products(builder, total, row, codes):
        """``total`` + the row's pair of features times the codes', per int32 lane."""
        if vnni:                                   # with AVX-VNNI alone LLVM emits the VEX form
            dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(int_vector, [int_vector] * 3),
                                                 f"llvm.x86.avx512.vpdpwssd.{32 * lanes}")
            return builder.call(dot, [total, row, codes])
        madd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(int_vector, [pair_vector] * 2),
                                              "llvm.x86.avx2.pmadd.wd")
        return builder.add(total, builder.call(madd, [builder.bitcast(row, pair_vector),
                                                      builder.bitcast(codes, pair_vector)]))

    def codegen(context, builder, signature, args):
        rows_at, row_bytes, rows, codes_at, pairs, scales_at, out_at = args
        sums = [[cgutils.alloca_once(builder, int_vector) for _ in range(registers)] for _ in range(rows_a_pass)]
        step = ir.Constant(_I64, rows_a_pass)
        blocks = builder.udiv(builder.add(rows, ir.Constant(_I64, BLOCK_ROWS - 1)), ir.Constant(_I64, BLOCK_ROWS))
        passes = builder.mul(blocks, ir.Constant(_I64, parts * BLOCK_ROWS // rows_a_pass))
        with cgutils.for_range(builder, passes) as pass_loop:
            part = builder.urem(pass_loop.index, ir.Constant(_I64, parts))     # codes from codes_a_pass part
            first = builder.mul(builder.udiv(pass_loop.index, ir.Constant(_I64, parts)), step)
            part_bytes = builder.mul(part, ir.Constant(_I64, 4 * codes_a_pass))
            row_at = [builder.add(rows_at, builder.mul(builder.add(first, ir.Constant(_I64, r)), row_bytes))
                      for r in range(rows_a_pass)]
            for row_sums in sums:
                for register in row_sums:
                    builder.store(ir.Constant(int_vector, [0] * lanes), register)
            with cgutils.for_range(builder, pairs) as pair_loop:
                p = pair_loop.index
                block_at = builder.add(codes_at, builder.add(builder.mul(p, ir.Constant(_I64, 128)), part_bytes))
                codes = [builder.load(_at(builder, block_at, ir.Constant(_I64, 4 * lanes * j), int_vector), align=4)
                         for j in range(registers)]
                for r in range(rows_a_pass):
                    word = builder.load(_at(builder, row_at[r], builder.mul(p, ir.Constant(_I64, 4)), _I32), align=4)
                    row = _splat(builder, word, int_vector)
                    for j in range(registers):
                        builder.store(add_products(builder, builder.load(sums[r][j]), row, codes[j]), sums[r][j])
            for r in range(rows_a_pass):
                row = builder.add(first, ir.Constant(_I64, r))
                scale = _splat(builder, builder.load(_at(builder, scales_at, builder.mul(row, ir.Constant(_I64, 4)),
                                                         _F32)), float_vector)
                out_row = builder.add(out_at, builder.add(builder.mul(row, ir.Constant(_I64, 128)), part_bytes))
                for j in range(registers):
                    value = builder.fmul(builder.sitofp(builder.load(sums[r][j]), float_vector), scale)
                    builder.store(value, _at(builder, out_row, ir.Constant(_I64, 4 * lanes * j), float_vector), align=4)
        return context.get_dummy_value()
    return codegen


PRODUCTS = {   # the int16 screen's block products, the one preferred first: (shape, CPU features, either set)
    # zmm, AVX-512 VNNI: per pair of features two registers of codes, and for each of 8 rows the row's
    # pair broadcast and two vpdpwssd into its two registers of sums (16 of the 32 zmm registers; measured
    # against 2 and 4 rows in benchmarks/NOTES.md, round 11)
    "vnni-512": ((16, 8, 32, True), ({"+avx512f", "+avx512vnni"},)),
    # ymm, AVX-VNNI (Intel client cores since Alder Lake: AVX2's 16 vector registers, no AVX-512): per pair
    # and half of the codes two registers of 8 codes, and for each of 4 rows a broadcast and two vpdpwssd
    "vnni-256": ((8, 4, 16, True), ({"+avxvnni"}, {"+avx512vnni", "+avx512vl"})),
    # ymm without VNNI (AVX2): vpmaddwd and vpaddd, the same layout and sums
    "madd-256": ((8, 4, 16, False), ({"+avx2"},)),
}
# a shape: int32 lanes a register, rows a pass, codes a pass, and whether the product is vpdpwssd (_dot_s16_codegen)


@intrinsic
def named_block_product(typingctx, name, rows_at, row_bytes, rows, codes_at, pairs, scales_at, out_at):
    """``out[r, c] = scales[r] * float32(sum_d q[r, d] e[c, d])`` for r < ``rows`` rounded up to a multiple
    of ``BLOCK_ROWS`` (at most 32; the rows past ``rows`` must be readable) and 32 codes c, by the product
    of ``PRODUCTS`` called ``name``; the sums are exact in int32 (two int16 products added to an int32 lane,
    wrapping on overflow, so the caller keeps ``D max|q| max|e| < 2^31`` and no -32768: nearest_int16.py).

    ``name``: a string constant (a closure's variable or a literal); only that product's code is generated.
    Code that picks its product this way is cached by Numba, where a closure over one intrinsic per product
    was not: an intrinsic's pickle, part of the cache's key, differs from one process to the next, and the
    screen was compiled anew in every process (4.4 s before the first search; NOTES.md, round 14).

    ``rows_at``: int16 rows q, ``row_bytes`` apart, ``2 * pairs`` features each. ``codes_at``: int16 codes
    of one block of 32, 128 bytes per pair of features: ``[p][h][c][s]``, code ``16 h + c``, feature
    ``2 p + s``. ``scales_at``: float32 per row; ``out_at``: 32 x 32 float32 (rows of 128 bytes).
    """
    if not isinstance(name, types.StringLiteral) or name.literal_value not in PRODUCTS:
        return None
    product = _dot_s16_codegen(*PRODUCTS[name.literal_value][0])

    def codegen(context, builder, signature, args):
        return product(context, builder, signature, args[1:])
    return types.none(name, *([types.intp] * 7)), codegen
