"""The ``"numba"`` backend's nearest-code search: a certified screen where one runs, the fused kernel for the
rest. The screens give the fused kernel's indices (screen.py), so which one ran changes only the time.

- AMX tiles (nearest_amx.py, bf16): Intel Xeons since Sapphire Rapids. ``MINIVQ_NUMBA_AMX=0`` turns it off.
- Otherwise int16 block products (nearest_int16.py), the first the CPU has of: VNNI's ``vpdpwssd`` in zmm
  registers (AVX-512 VNNI: Intel since Cascade Lake, AMD since Zen 4) or in ymm (AVX-VNNI: Intel client
  cores since Alder Lake), then, on CPUs without AVX-512, AVX2's ``vpmaddwd`` and ``vpaddd``.
  ``MINIVQ_NUMBA_INT16=0`` turns it off.
- Otherwise, and for float64, for what a screen declines and for the rows it leaves: the fused float32
  kernel (nearest_numba.py).
"""
import numpy as np

from . import amx, nearest_amx, nearest_int16, nearest_numba


def screen_name():
    """Which screen float32 searches get here: ``"amx"``, an int16 product's name (``"vnni-512"``,
    ``"vnni-256"``, ``"madd-256"``: simd.PRODUCTS) or None (the fused kernel alone)."""
    if amx.available():
        return "amx"
    return nearest_int16.product_name()


def nearest_code(x, codebook, metric="l2", check_x=None):
    """Arguments as ``nearest_numba.nearest_code_numba``'s; the same indices."""
    x = np.ascontiguousarray(x)
    screened = None
    if x.shape[0] and x.dtype == np.float32:
        screen = screen_name()
        if screen is not None:
            search = nearest_amx.nearest_code_amx if screen == "amx" else nearest_int16.nearest_code_int16
            screened = search(x, codebook, nearest_numba.score_norms(codebook, metric))
    if screened is None:
        return nearest_numba.nearest_code_numba(x, codebook, metric, check_x)
    out, spilled = screened
    if spilled.any():
        out[spilled] = nearest_numba.nearest_code_numba(x[spilled], codebook, metric, check_x)
    return out
