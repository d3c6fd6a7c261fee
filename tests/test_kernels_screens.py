"""The certified screens of the nearest-code search (screen.py with nearest_amx.py's bf16 tiles and
nearest_int16.py's int16 products, each of simd.PRODUCTS): the same indices as the fused float32 kernel
on every input, ties and near-ties included, and the ways out (NaN, huge values, float64, too many
near-equal codes, the switches). Each test runs once per screen this CPU has and is skipped for the
others; CPUs without AVX-512 are held in subprocesses."""
import numpy as np
import pytest

pytest.importorskip("numba")

from minivq import kernels  # noqa: E402
from minivq.kernels import nearest_amx, nearest_int16, nearest_numba, nearest_screened, screen, simd  # noqa: E402

SCREENS = {  # name: (module, its search, its switch, the settings that leave it the one to run)
    "amx": (nearest_amx, nearest_amx.nearest_code_amx, "MINIVQ_NUMBA_AMX", {}),
    **{product: (nearest_int16, nearest_int16.nearest_code_int16, "MINIVQ_NUMBA_INT16",
                 {"MINIVQ_NUMBA_AMX": "0", "MINIVQ_NUMBA_INT16": product})     # each product, where the CPU has it
       for product in simd.PRODUCTS},
}


@pytest.fixture(params=sorted(SCREENS))
def which(request, monkeypatch):
    """The screen under test, the only one switched on (so the backend runs it)."""
    name = request.param
    for variable, value in SCREENS[name][3].items():
        monkeypatch.setenv(variable, value)
    if nearest_screened.screen_name() != name:
        pytest.skip(f"this CPU or Numba has no {name} screen")
    return name


def fused(x, codebook, metric="l2"):
    return nearest_numba.nearest_code_numba(x, codebook, metric)


def backend(x, codebook, metric="l2"):
    """What ``kernels.nearest_code(backend="numba")`` runs: the screen, and the fused kernel for what it leaves."""
    return nearest_screened.nearest_code(x, codebook, metric)


def screened(x, codebook, metric="l2"):
    """The screen switched on alone: (indices, spilled); fails the test where it declines."""
    search = SCREENS[nearest_screened.screen_name()][1]
    got = search(np.ascontiguousarray(x), codebook, nearest_numba.score_norms(codebook, metric))
    assert got is not None, "the screen declined"
    return got


def assert_same_as_fused(x, codebook, metric="l2"):
    indices, spilled = screened(x, codebook, metric)
    expected = fused(x, codebook, metric)
    np.testing.assert_array_equal(indices[~spilled], expected[~spilled])
    np.testing.assert_array_equal(backend(x, codebook, metric), expected)
    np.testing.assert_array_equal(kernels.nearest_code(x, codebook, backend="numba", metric=metric), expected)
    return spilled


# ----------------------------------------------------------------- the same indices as the fused kernel
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (5, 3, 2), (31, 33, 31), (33, 31, 33), (129, 65, 64), (300, 512, 64),
                                   (257, 100, 257), (1000, 40, 7), (130, 2048, 96)])
def test_the_screen_gives_the_fused_kernels_indices(which, rng, metric, n, k, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    codebook = rng.standard_normal((k, d)).astype(np.float32)
    assert not assert_same_as_fused(x, codebook, metric).any()


@pytest.mark.parametrize("seed", range(6))
def test_random_sizes_scales_and_offsets(which, seed):
    rng = np.random.default_rng(seed)
    n, k, d = rng.integers(1, 400), rng.integers(1, 700), rng.integers(1, 300)
    scale = 10.0 ** rng.uniform(-18, 12)          # norms stay under the screen's range limit (2^100)
    offset = rng.standard_normal(d) * rng.choice([0, 1, 100])     # far from the origin: a wide margin
    x = ((rng.standard_normal((n, d)) + offset) * scale).astype(np.float32)
    codebook = ((rng.standard_normal((k, d)) + offset) * scale).astype(np.float32)
    assert_same_as_fused(x, codebook)


def test_training_like_latents_near_their_codes(which, rng):
    codebook = rng.standard_normal((512, 64)).astype(np.float32)
    x = (codebook[rng.integers(0, 512, 4000)] + 0.05 * rng.standard_normal((4000, 64))).astype(np.float32)
    assert not assert_same_as_fused(x, codebook).any()


# ----------------------------------------------------------------- ties and near-ties
@pytest.mark.parametrize("copies", [2, 31, 32, 33, 200])
def test_duplicated_codes_tie_to_the_first_copy(which, rng, copies):
    # more copies than a row may hold at once (CAPACITY) must still end at the lowest index
    base = rng.standard_normal((10, 48)).astype(np.float32)
    codebook = np.concatenate([base, np.repeat(base[3:4], copies, axis=0), base[:2]])
    codebook = codebook[rng.permutation(codebook.shape[0])]
    x = (base[rng.integers(0, 10, 600)] + 0.01 * rng.standard_normal((600, 48))).astype(np.float32)
    spilled = assert_same_as_fused(x, codebook)
    got = backend(x, codebook)
    first = {}
    for i, row in enumerate(codebook.tolist()):
        first.setdefault(tuple(row), i)
    assert all(first[tuple(codebook[j].tolist())] == j for j in got)
    if copies > screen.CAPACITY:
        assert spilled.any()          # the rows nearest the repeated code were handed to the fused kernel


def test_codes_one_ulp_apart_are_decided_by_float32_rounding(which, rng):
    # 64 codes that differ from one another by an ulp in a few features: the screen cannot tell them apart,
    # so every row's answer comes from the float32 scores, and must be the fused kernel's to the index
    base = rng.standard_normal(40).astype(np.float32)
    codebook = np.repeat(base[None], 64, axis=0)
    for j in range(64):
        feature = rng.integers(0, 40, 3)
        codebook[j, feature] = np.nextafter(codebook[j, feature], np.float32(rng.choice([-1, 1]) * np.inf))
    x = (base + 1e-6 * rng.standard_normal((500, 40))).astype(np.float32)
    assert_same_as_fused(x, codebook)


def test_a_new_lowest_score_in_every_block_fills_and_compacts_the_candidates(which, rng):
    # block b of 32 codes holds one code nearer to every row than all of blocks 0..b-1 (the rest point
    # away): each block lowers the rows' thresholds and adds a candidate, so a row gathers more than
    # CAPACITY over the sweep and must drop those the threshold has passed (while only the last few
    # stay within it: no row is handed back)
    d, blocks = 24, 3 * screen.CAPACITY
    direction = rng.standard_normal(d).astype(np.float32)
    codebook = (-direction[None] * (3 + rng.random((blocks * 32, 1)))).astype(np.float32)    # scores >= 15 |d|^2
    codebook[::32] = direction[None] * (1 + np.linspace(2.0, 0.0, blocks, dtype=np.float32)[:, None])  # <= 3 |d|^2
    x = (direction[None] + 1e-3 * rng.standard_normal((70, d))).astype(np.float32)
    assert not assert_same_as_fused(x, codebook).any()
    np.testing.assert_array_equal(fused(x, codebook), np.full(70, (blocks - 1) * 32))


@pytest.mark.parametrize("seed", range(4))
def test_clusters_of_near_equal_codes(which, seed):
    # each cluster: one code and copies a few ulps away in a few features, shuffled through the codebook
    rng = np.random.default_rng(seed)
    k, d = 600, int(rng.integers(8, 130))
    centres = rng.standard_normal((30, d)).astype(np.float32)
    codebook = centres[rng.integers(0, 30, k)]
    nudge = rng.random((k, d)) < 0.05
    codebook = np.where(nudge, np.nextafter(codebook, np.float32(np.inf) * np.sign(rng.standard_normal((k, d)))),
                        codebook).astype(np.float32)
    x = (centres[rng.integers(0, 30, 900)] + 1e-5 * rng.standard_normal((900, d))).astype(np.float32)
    assert_same_as_fused(x, codebook)


def test_rows_halfway_between_two_codes(which, rng):
    a = rng.standard_normal((50, 20)).astype(np.float32)
    b = a + rng.standard_normal((50, 20)).astype(np.float32)
    codebook = np.concatenate([a, b, rng.standard_normal((50, 20)).astype(np.float32) + 20])
    assert_same_as_fused((a + b) / 2, codebook)


# ----------------------------------------------------------------- the ways out
def test_rows_holding_nan_or_inf_go_to_the_fused_kernel(which, rng):
    x = rng.standard_normal((200, 16)).astype(np.float32)
    codebook = rng.standard_normal((30, 16)).astype(np.float32)
    x[7, 3] = np.nan
    x[150, 0] = np.inf
    indices, spilled = screened(x, codebook)
    assert set(np.flatnonzero(spilled)) == {7, 150}
    with pytest.raises(kernels.NonFiniteError):
        kernels.nearest_code(x, codebook, backend="numba")


def test_rows_near_float32s_range_go_to_the_fused_kernel(which, rng):
    x = rng.standard_normal((100, 8)).astype(np.float32)
    x[5] *= np.float32(1e30)
    codebook = rng.standard_normal((20, 8)).astype(np.float32)
    indices, spilled = screened(x, codebook)
    assert np.flatnonzero(spilled).tolist() == [5]
    np.testing.assert_array_equal(backend(x, codebook), fused(x, codebook))


def test_the_screen_declines_float64_huge_codebooks_and_empty_inputs(which, rng):
    search = SCREENS[which][1]
    x = rng.standard_normal((10, 4))
    codebook = rng.standard_normal((5, 4))
    norms = nearest_numba.score_norms(codebook)
    assert search(x, codebook, norms) is None
    big = (codebook * 1e36).astype(np.float32)
    assert search(x.astype(np.float32), big, nearest_numba.score_norms(big)) is None
    empty = np.empty((0, 4), np.float32)
    assert search(empty, codebook.astype(np.float32), norms.astype(np.float32)) is None


@pytest.mark.parametrize("name", sorted(SCREENS))
def test_the_switch_turns_the_screen_off(name, monkeypatch, rng):
    _, search, switch, _ = SCREENS[name]
    monkeypatch.setenv(switch, "0")
    x = rng.standard_normal((10, 4)).astype(np.float32)
    codebook = rng.standard_normal((5, 4)).astype(np.float32)
    assert search(x, codebook, nearest_numba.score_norms(codebook)) is None
    assert nearest_screened.screen_name() != name


def test_without_amx_the_first_int16_product_the_cpu_has_runs(monkeypatch):
    monkeypatch.setenv("MINIVQ_NUMBA_AMX", "0")
    features = simd.target_features()
    if {"+avx512f", "+avx512vnni"} <= features:
        expected = "vnni-512"
    elif "+avxvnni" in features:
        expected = "vnni-256"
    elif "+avx2" in features and "+avx512f" not in features:     # AVX-512's FMAs beat ymm vpmaddwd
        expected = "madd-256"
    else:
        expected = None
    assert nearest_screened.screen_name() == expected
    monkeypatch.setenv("MINIVQ_NUMBA_INT16", "madd-256")      # asks for one product, where it runs
    assert nearest_screened.screen_name() == ("madd-256" if "+avx2" in features else None)


AVX2 = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+popcnt,+sahf,+sse,"
        "+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,-avx512f,-avx512bw,-avx512dq,-avx512vl,-avx512cd,-avx512vnni,"
        "-avx512bf16,-avx512fp16")


@pytest.mark.parametrize("cpu,features,expected", [("haswell", AVX2 + ",-avxvnni", "madd-256"),
                                                   ("alderlake", AVX2 + ",+avxvnni", "vnni-256")])
def test_an_avx2_cpu_runs_its_ymm_screen_with_the_fused_kernels_indices(cpu, features, expected):
    # Numba held to a CPU without AVX-512 (16 vector registers; benchmarks/as_avx2.sh [--vnni]): the screen
    # chosen there, and its indices against the fused kernel compiled for the same CPU
    import os
    import subprocess
    import sys
    needed = {"+avx2", "+avxvnni"} if expected == "vnni-256" else {"+avx2"}
    if not needed <= simd.target_features():
        pytest.skip("this CPU cannot run the held code")
    script = (
        "import numpy as np\n"
        "from minivq.kernels import nearest_numba, nearest_screened\n"
        "rng = np.random.default_rng(3)\n"
        "for n, k, d in [(300, 100, 37), (1000, 700, 64), (77, 40, 256)]:\n"
        "    x = rng.standard_normal((n, d)).astype(np.float32)\n"
        "    e = np.concatenate([rng.standard_normal((k, d)), np.zeros((3, d))]).astype(np.float32)\n"
        "    x[:5] = 0\n"                                          # ties among the three zero codes
        "    assert (nearest_screened.nearest_code(x, e) == nearest_numba.nearest_code_numba(x, e)).all()\n"
        "print(nearest_screened.screen_name())\n")
    held = {"NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features, "MINIVQ_NUMBA_AMX": "0"}
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **held},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [expected]


def test_one_thread_runs_the_serial_sweep_with_the_same_result(which, rng, monkeypatch):
    import numba
    x = rng.standard_normal((700, 70)).astype(np.float32)
    codebook = rng.standard_normal((300, 70)).astype(np.float32)
    expected = fused(x, codebook)
    called = []
    module = SCREENS[which][0]
    if which == "amx":
        monkeypatch.setattr(module, "_screen_kernel", lambda *a: called.append("parallel") or
                            module._screen_kernel_serial(*a))
    else:
        parallel, serial = module._screen_kernels[which]
        monkeypatch.setitem(module._screen_kernels, which,
                            (lambda *a: called.append("parallel") or serial(*a), serial))
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        np.testing.assert_array_equal(screened(x, codebook)[0], expected)
    finally:
        numba.set_num_threads(previous)
    assert called == []
    np.testing.assert_array_equal(screened(x, codebook)[0], expected)
    assert called == ["parallel"] or previous == 1


def test_a_screen_compiled_once_is_loaded_from_numba_s_cache_in_the_next_process(which, tmp_path):
    """The screens' kernels are closures (one per product and thread count): Numba keys their cache on what
    they close over, and a closure over an intrinsic missed it in every process (4.4 s to the first search;
    benchmarks/NOTES.md, round 14). Two processes share a fresh cache: the second compiles nothing."""
    import os
    import subprocess
    import sys
    script = ("import numpy as np; from minivq import kernels; from minivq.kernels import nearest_int16, "
              "nearest_amx; rng = np.random.default_rng(0); x = rng.standard_normal((300, 20), dtype=np.float32); "
              "e = rng.standard_normal((70, 20), dtype=np.float32); kernels.nearest_code(x, e, backend='numba'); "
              "kernels.nearest_code(x[:1], e, backend='numba'); "       # the same search, one thread's kernels too
              "screens = [*nearest_int16._screen_kernels.values(), (nearest_amx._screen_kernel, "
              "nearest_amx._screen_kernel_serial), tuple(nearest_int16.block_calls.values())]; "
              "used = [k for pair in screens for k in pair if k.signatures]; assert used; "
              "print(sum(len(k.stats.cache_misses) for k in used), sum(len(k.stats.cache_hits) for k in used))")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))
    for variable, value in SCREENS[which][3].items():
        env[variable] = value
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr[-2000:]
    (first_misses, _), (misses, hits) = [map(int, run.stdout.split()) for run in runs]
    assert first_misses > 0 and misses == 0 and hits > 0, [run.stdout for run in runs]
