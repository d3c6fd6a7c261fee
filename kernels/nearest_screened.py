"""The ``"numba"`` backend's nearest-code search: a certified screen where one runs, the fused kernel for the
rest. The screens give the fused kernel's indices (screen.py), so which one ran changes only the time.

- AMX tiles (nearest_amx.py, bf16): Intel Xeons since Sapphire Rapids. ``MINIVQ_NUMBA_AMX=0`` turns it off.
- Otherwise VNNI's int16 products (nearest_vnni.py): in zmm registers with AVX-512 VNNI (Intel since
  Cascade Lake, AMD since Zen 4), else in ymm registers with AVX-VNNI (Intel client cores since Alder
  Lake, which lack AVX-512). ``MINIVQ_NUMBA_VNNI=0`` turns it off.
- Otherwise, and for float64, for what a screen declines and for the rows it leaves: the fused float32
  kernel (nearest_numba.py).
"""
import numpy as np

from . import amx, nearest_amx, nearest_numba, nearest_vnni


def screen_name():
    """Which screen float32 searches get here: ``"amx"``, ``"vnni"`` (zmm), ``"avx-vnni"`` (ymm) or None (the
    fused kernel alone)."""
    if amx.available():
        return "amx"
    return {512: "vnni", 256: "avx-vnni", None: None}[nearest_vnni.width()]


def nearest_code(x, codebook, metric="l2", check_x=None):
    """Arguments as ``nearest_numba.nearest_code_numba``'s; the same indices."""
    x = np.ascontiguousarray(x)
    screened = None
    if x.shape[0] and x.dtype == np.float32:
        screen = screen_name()
        if screen is not None:
            search = nearest_amx.nearest_code_amx if screen == "amx" else nearest_vnni.nearest_code_vnni
            screened = search(x, codebook, nearest_numba.score_norms(codebook, metric))
    if screened is None:
        return nearest_numba.nearest_code_numba(x, codebook, metric, check_x)
    out, spilled = screened
    if spilled.any():
        out[spilled] = nearest_numba.nearest_code_numba(x[spilled], codebook, metric, check_x)
    return out
