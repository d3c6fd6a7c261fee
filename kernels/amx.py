"""Intel AMX tile instructions for Numba: eight tile registers and a bf16 matrix product.

AMX (Sapphire Rapids and later Xeons) adds eight "tile" registers of up to
16 rows x 64 bytes and ``tdpbf16ps``, which multiplies a 16 x 32 bf16 tile by
a 32 x 16 bf16 tile and adds the products into a 16 x 16 float32 tile: 8,192
multiply-adds in one instruction. One core of the AVX-512 Xeon these kernels
were measured on runs it at about 3 TFLOP/s, against 150 GFLOP/s for its
float32 SGEMM (benchmarks/NOTES.md, round 10).

Numba has no tile type, so each instruction is an ``@intrinsic`` that emits
the LLVM intrinsic of the same name; the tile numbers are compile-time
constants (LLVM wants them as immediates). Addresses are plain integers
(``array.ctypes.data``), strides are in bytes.

Before a thread may touch a tile it must load a tile configuration (the
shape of every tile, ``tile_config``) and the process must have asked Linux
for the right to use the tile state (``request_permission``: the kernel then
saves it on context switches). ``available()`` says whether the CPU (as
Numba compiles for it) and the kernel allow it and a first tile product
comes out right; where not, nothing here is ever called.
"""
import ctypes
import os
import platform
import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import RequireLiteralValue
from numba.extending import intrinsic

from .simd import target_features

_SYS_ARCH_PRCTL = 158             # x86-64 Linux
_ARCH_GET_XCOMP_PERM = 0x1022
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18

TILE_ROWS = 16                    # rows of every tile used here
TILE_BYTES = 64                   # bytes per row: 32 bf16 or 16 float32


def request_permission():
    """Ask Linux for the AMX tile state (once per process; idempotent). True when granted."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        call, long = libc.syscall, ctypes.c_long        # syscall(2) is variadic: pass longs, not C ints
        if call(long(_SYS_ARCH_PRCTL), long(_ARCH_REQ_XCOMP_PERM), long(_XFEATURE_XTILEDATA)) != 0:
            return False          # a kernel older than 5.16, or one that refuses
        granted = ctypes.c_uint64(0)
        if call(long(_SYS_ARCH_PRCTL), long(_ARCH_GET_XCOMP_PERM), ctypes.byref(granted)) != 0:
            return False
        return bool(granted.value >> _XFEATURE_XTILEDATA & 1)
    except Exception:
        return False


_available = None


def available():
    """Whether the bf16 tile product can run here: the CPU has AMX-TILE and AMX-BF16, Linux granted the
    tile state, the product of two small integer tiles comes out exact (``_self_test``: this llvmlite
    compiles the instructions and the CPU runs them as documented), and ``MINIVQ_NUMBA_AMX`` is not ``0``
    (the switch that turns this path off)."""
    global _available
    if os.environ.get("MINIVQ_NUMBA_AMX", "1") == "0":
        return False
    if _available is None:
        _available = False
        if {"+amx-tile", "+amx-bf16"} <= target_features() and request_permission():
            try:
                _available = _self_test()
            except Exception:         # an llvmlite that cannot emit the intrinsics: the fused kernel runs
                _available = False
    return _available


def tile_config_bytes():
    """The 64-byte configuration ``tile_config`` loads: palette 1, all eight tiles 16 rows x 64 bytes."""
    config = np.zeros(64, dtype=np.uint8)
    config[0] = 1                                             # palette 1: the eight-tile layout
    config[16:32].view(np.uint16)[:8] = TILE_BYTES            # bytes per row, tiles 0-7
    config[48:56] = TILE_ROWS                                 # rows, tiles 0-7
    return config


# ---------------------------------------------------------------- the instructions
_I8, _I64, _VOID = ir.IntType(8), ir.IntType(64), ir.VoidType()


def _declare(builder, name, arguments):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VOID, arguments), name)


def _tile_number(value):
    if not isinstance(value, types.IntegerLiteral):
        raise RequireLiteralValue("a tile number must be a compile-time constant")
    if not 0 <= value.literal_value < 8:
        raise ValueError(f"tile {value.literal_value} does not exist: AMX has tiles 0-7")
    return ir.Constant(_I8, value.literal_value)


def _pointer(builder, address):
    return builder.inttoptr(address, ir.PointerType(_I8))


@intrinsic
def tile_config(typingctx, address):
    """``ldtilecfg``: load the 64-byte tile configuration at ``address`` into this thread."""
    def codegen(context, builder, signature, args):
        pointer = _pointer(builder, args[0])
        builder.call(_declare(builder, "llvm.x86.ldtilecfg", [pointer.type]), [pointer])
        return context.get_dummy_value()
    return types.none(types.intp), codegen


@intrinsic
def tile_release(typingctx):
    """``tilerelease``: return the tiles to their initial state (the OS then need not save them)."""
    def codegen(context, builder, signature, args):
        builder.call(_declare(builder, "llvm.x86.tilerelease", []), [])
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def tile_zero(typingctx, tile):
    """``tilezero``: tile := 0."""
    number = _tile_number(tile)

    def codegen(context, builder, signature, args):
        builder.call(_declare(builder, "llvm.x86.tilezero", [_I8]), [number])
        return context.get_dummy_value()
    return types.none(tile), codegen


def _strided(llvm_name, tile):
    """Typing and code for a tile instruction on memory: (tile, address, stride in bytes)."""
    number = _tile_number(tile)

    def codegen(context, builder, signature, args):
        pointer = _pointer(builder, args[1])
        builder.call(_declare(builder, llvm_name, [_I8, pointer.type, _I64]), [number, pointer, args[2]])
        return context.get_dummy_value()
    return types.none(tile, types.intp, types.intp), codegen


@intrinsic
def tile_load(typingctx, tile, address, stride):
    """``tileloadd``: tile row r := the 64 bytes at ``address + r * stride``."""
    return _strided("llvm.x86.tileloadd64", tile)


@intrinsic
def tile_store(typingctx, tile, address, stride):
    """``tilestored``: the 64 bytes at ``address + r * stride`` := tile row r."""
    return _strided("llvm.x86.tilestored64", tile)


@intrinsic
def tile_dot_bf16(typingctx, out, a, b):
    """``tdpbf16ps``: out[m, n] += sum over p of a[m, 2p] b[p, 2n] + a[m, 2p + 1] b[p, 2n + 1].

    ``a``: 16 rows of 32 bf16; ``b``: 16 rows of 16 *pairs* of bf16 (the pairs of
    consecutive features of 16 columns); ``out``: 16 x 16 float32. The products
    of two bf16 are exact in float32; the sums round to nearest even, and
    subnormal inputs and results are flushed to zero.
    """
    numbers = [_tile_number(t) for t in (out, a, b)]

    def codegen(context, builder, signature, args):
        builder.call(_declare(builder, "llvm.x86.tdpbf16ps", [_I8, _I8, _I8]), numbers)
        return context.get_dummy_value()
    return types.none(out, a, b), codegen


# ---------------------------------------------------------------- a check before first use
@njit(nogil=True, cache=True)
def _tile_product(config, a, b, out):
    """out := a (16 x 32 bf16) times b (16 feature pairs x 16 columns x 2 bf16), through tiles 0, 4, 6."""
    tile_config(config.ctypes.data)
    tile_zero(0)
    tile_load(4, a.ctypes.data, TILE_BYTES)
    tile_load(6, b.ctypes.data, TILE_BYTES)
    tile_dot_bf16(0, 4, 6)
    tile_store(0, out.ctypes.data, TILE_BYTES)
    tile_release()


def _self_test():
    """One 16 x 32 by 32 x 16 tile product of small integers (exact in bf16 and float32) against NumPy."""
    rng = np.random.default_rng(0)
    a = rng.integers(-8, 9, (16, 32)).astype(np.float32)
    b = rng.integers(-8, 9, (32, 16)).astype(np.float32)
    pairs = np.ascontiguousarray(b.reshape(16, 2, 16).transpose(0, 2, 1))     # row p: (b[2p, n], b[2p+1, n])
    out = np.zeros((16, 16), dtype=np.float32)
    _tile_product(tile_config_bytes(), (a.view(np.uint32) >> 16).astype(np.uint16),
            (pairs.view(np.uint32) >> 16).astype(np.uint16), out)
    return bool(np.array_equal(out, a @ b))
