"""The step profiler and the prior's step benchmark run, and say what they measured."""
import json
import os
import re
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


@pytest.mark.parametrize("model", ["vqvae", "prior"])
def test_profile_step_times_every_op_and_names_the_convolutions(tmp_path, model):
    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, os.path.join(BENCH, "profile_step.py"), "--model", model, "--batch", "2",
                           "--steps", "2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    ops = {row["op"]: row for row in result["rows"]}
    convs = [row for name, row in ops.items() if name.startswith("Conv")]
    assert convs and all(row["gflops"] and row["gflops"] > 0 for row in convs)
    expected = "Conv2d 3x3/1 128->32 at 8x8" if model == "vqvae" else "Conv2d 3x5/1 32->64 at 8x8"
    assert expected in ops and ops[expected]["backward_ms"] > 0
    search = "nearest code (kernels.nearest_code)"       # no graph node, but a row of its own
    assert (search in ops and ops[search]["forward_ms"] > 0) == (model == "vqvae")
    listed = sum(row["forward_ms"] + row["backward_ms"] for row in result["rows"]) + result["adam_ms"]
    assert 0 < listed <= result["step_ms"] * 1.05        # the rows are parts of the step, not more
    assert "outside the rows" in done.stdout


def test_profile_step_profiles_the_pytorch_twin_too(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, os.path.join(BENCH, "profile_step.py"), "--batch", "2", "--steps", "1",
                           "--threads", "1", "--torch", "--json", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    peer = json.loads(out.read_text())["torch"]
    assert 0 < peer["convolutions_ms"] < peer["step_self_cpu_ms"]
    assert any("convolution" in op["op"] for op in peer["ops"])
    assert "PyTorch twin, torch.profiler" in done.stdout
    # by shape: the paper's model has five distinct convolutions forward, each listed with its weight
    forward = [layer for layer in peer["convolutions_by_shape"] if layer["op"] == "aten::mkldnn_convolution"]
    assert len(forward) >= 5 and all(layer["self_cpu_ms"] > 0 for layer in forward)
    assert any("[128, 128, 3, 3]" in layer["shapes"] for layer in forward)


def test_the_profiler_puts_the_ops_back(monkeypatch):
    sys.path.insert(0, BENCH)
    try:
        import profile_step
    finally:
        sys.path.remove(BENCH)
    from minivq.autograd import Function
    from minivq.functional import quantize
    from minivq.functional.basic import ReLU
    call, backward, search = Function.__call__, ReLU.backward, quantize.nearest_code
    undo = profile_step.Recorder().install()
    import minivq as mv
    from minivq import functional as F
    F.relu(mv.tensor([1.0, -1.0], requires_grad=True)).sum().backward()
    assert ReLU.backward is not backward
    undo()
    assert Function.__call__ is call and ReLU.backward is backward and quantize.nearest_code is search


def test_bench_train_step_times_the_prior(tmp_path):
    out = tmp_path / "prior.json"
    done = subprocess.run([sys.executable, os.path.join(BENCH, "bench_train_step.py"), "--model", "prior",
                           "--batches", "2", "--repeats", "1", "--warmup", "0", "--pause", "0", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["model"] == "prior" and result["pause_s"] == 0
    (row,) = result["rows"]
    assert row["batch"] == 2 and row["minivq_ms"] > 0 and row["flops"] > 0


@pytest.mark.parametrize("model", ["vqvae", "prior"])
def test_bench_train_step_times_the_workers_step_too(tmp_path, model):
    pytest.importorskip("threadpoolctl")
    out = tmp_path / "workers.json"
    done = subprocess.run([sys.executable, os.path.join(BENCH, "bench_train_step.py"), "--workers", "2",
                           "--model", model, "--batches", "4", "--repeats", "1", "--warmup", "0", "--pause", "0",
                           "--threads", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["workers"] == 2 and row["minivq_workers_ms"] > 0 and row["minivq_ms"] > 0
    assert "over 2 worker threads" in done.stdout


@pytest.mark.parametrize("probe, last_lr", [("control", 1e-3), ("cosine", 0.0), ("anneal", 0.0), ("lr5e-4", 5e-4)])
def test_optimizer_probe_trains_the_defaults_with_its_setting(tmp_path, monkeypatch, probe, last_lr):
    from conftest import write_blobs
    sys.path.insert(0, BENCH)
    try:
        import optimizer_probe
    finally:
        sys.path.remove(BENCH)
    import minivq.train
    adam = minivq.train.Adam
    monkeypatch.setenv("MINIVQ_DATA", write_blobs(tmp_path / "blobs.npz", 160, 40))
    monkeypatch.setattr(optimizer_probe, "RUNS", str(tmp_path / "runs"))
    optimizer_probe.train_one(probe, 0, 3)
    record = json.loads((tmp_path / "runs" / f"{probe}-s0-3" / "probe.json").read_text())
    assert record["step"] == 3 and record["images"] == 40 and 0 < record["nmse"] < 10
    assert record["last_lr"] == pytest.approx(last_lr, abs=1e-12)
    assert minivq.train.Adam is adam          # the trainer's own Adam is put back
    assert optimizer_probe.cosine_lr(1e-3, 1, 5) == 1e-3 and optimizer_probe.cosine_lr(1e-3, 3, 5) == 5e-4


def test_run_single_threaded_gives_each_run_one_thread_and_stops_at_a_failure(tmp_path):
    sys.path.insert(0, BENCH)
    try:
        from _machine import run_single_threaded
    finally:
        sys.path.remove(BENCH)
    write = "import os, sys; open(sys.argv[1], 'w').write(os.environ['OPENBLAS_NUM_THREADS'])"
    outs = [tmp_path / f"{i}.txt" for i in range(3)]
    run_single_threaded([[sys.executable, "-c", write, str(p)] for p in outs], 2, "test")
    assert [p.read_text() for p in outs] == ["1", "1", "1"]
    with pytest.raises(SystemExit, match="test: .* exited with 3"):
        run_single_threaded([[sys.executable, "-c", "raise SystemExit(3)"]], 2, "test")


def test_codebook_study_variants_are_valid_and_centring_is_the_variants_choice(tmp_path, monkeypatch):
    from conftest import write_blobs
    sys.path.insert(0, BENCH)
    try:
        import codebook_study
    finally:
        sys.path.remove(BENCH)
    from minivq.checkpoint import read_checkpoint
    from minivq.config import ModelConfig, TrainConfig
    for name, options in codebook_study.VARIANTS.items():       # every variant is a valid model setting
        ModelConfig(**{k: v for k, v in options.items() if k not in ("center_output", "lr_anneal")}).validate()
    assert codebook_study.VARIANTS[codebook_study.DEFAULT].get("center_output") is True
    assert codebook_study.VARIANTS[codebook_study.DEFAULT].get("lr_anneal") == TrainConfig().lr_anneal
    monkeypatch.setenv("MINIVQ_DATA", write_blobs(tmp_path / "blobs.npz", 160, 40))
    monkeypatch.setattr(codebook_study, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(codebook_study, "segments", lambda steps: [steps])
    monkeypatch.setattr(codebook_study, "MILESTONES", (2,))
    for variant, centred, anneal in (("ema-cosine8-dead", False, 0.0), (codebook_study.DEFAULT, True, 0.25)):
        folder = codebook_study.train_one(variant, 0, 2)
        meta, _ = read_checkpoint(os.path.join(folder, "checkpoint.npz"), "minivq-vqvae")
        assert meta["train"]["center_output"] is centred and meta["step"] == 2
        assert meta["train"]["lr_anneal"] == anneal and meta["train"]["planned_steps"] == 2
        assert folder.endswith("-plan2-s0") == bool(anneal)        # an annealed run's folder names its plan
        (record,) = [json.loads(line) for line in open(os.path.join(folder, "study.jsonl"))]
        assert record["step"] == 2 and record["codes_used"] >= 1 and 0 < record["nmse"] < 10


def test_bench_train_step_times_round_sevens_way_beside_and_records_the_threads(tmp_path):
    """``--blas-threads-too`` times the whole-batch step with BLAS's threads beside the kernels' threads; the
    JSON says over how many threads the kernels split the batch and how many BLAS ran in the step."""
    pytest.importorskip("threadpoolctl")
    pytest.importorskip("numba")
    out = tmp_path / "blas.json"
    done = subprocess.run([sys.executable, os.path.join(BENCH, "bench_train_step.py"), "--blas-threads-too",
                           "--batches", "4", "--repeats", "1", "--warmup", "0", "--pause", "0", "--threads", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["minivq_blas_threads_ms"] > 0 and row["kernel_threads_over_blas_threads"] > 0
    import numba
    if numba.config.NUMBA_NUM_THREADS >= 2:         # two threads asked for and had: the kernels take them
        assert result["minivq_conv_kernel_threads"] == 2 and result["minivq_blas_threads_in_step"] == 1
    else:
        assert result["minivq_conv_kernel_threads"] == 1
    assert "BLAS's threads (before round 8)" in done.stdout


def test_as_avx2_holds_the_numba_kernels_to_avx2_registers():
    """benchmarks/as_avx2.sh: minivq's AVX2 tile, Numba compiling without AVX-512 (no zmm register in the
    search's code), OpenBLAS on its Haswell kernels, no AMX screen but AVX2's int16 one (``vpmaddwd``: on
    this host with AVX-VNNI LLVM would fuse it into ``vpdpwssd``, so only held code runs the real thing);
    without a command, a usage line and exit 2."""
    pytest.importorskip("numba")
    script = os.path.join(BENCH, "as_avx2.sh")
    check = ("import os, numba, numpy as np; from minivq.kernels import nearest_numba as K; "
             "assert not K.WIDE and (K.ROWS, K.CODES) == (3, 32); "
             "assert numba.config.CPU_NAME == 'haswell' and '-avx512f' in numba.config.CPU_FEATURES; "
             "f = numba.njit(fastmath={'contract'})(K._nearest_kernel_serial.py_func); "
             "x = np.ones((8, 4), np.float32); p, n = K.pack_codebook(np.ones((40, 4), np.float32)); "
             "f(x, p, n, 1, np.empty(8, np.int64), np.empty(8, np.float32)); "
             "asm = f.inspect_asm(f.signatures[0]); assert 'ymm' in asm and 'zmm' not in asm; "
             "assert os.environ['OPENBLAS_CORETYPE'] == 'Haswell'; "
             "from minivq.kernels import nearest_screened, nearest_int16 as V; "
             "assert nearest_screened.screen_name() == 'madd-256'; "       # its self-test passed: exact sums
             "g = numba.njit(V.block_calls['madd-256'].py_func); q = np.zeros((8, 4), np.int16); "
             "g(q, np.zeros((2, 2, 16, 2), np.int16), np.ones(8, np.float32), np.empty((32, 32), np.float32)); "
             "asm = g.inspect_asm(g.signatures[0]); "
             "assert 'vpmaddwd' in asm and 'vpdpwssd' not in asm and 'zmm' not in asm")
    done = subprocess.run(["bash", script, sys.executable, "-c", check], capture_output=True, text=True, timeout=300,
                          cwd=os.path.join(BENCH, os.pardir))
    assert done.returncode == 0, done.stderr[-2000:]
    usage = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:")


def test_as_avx2_with_vnni_runs_the_ymm_screen_in_vex_code():
    """``as_avx2.sh --vnni``: an Alder Lake-like CPU, whose screen is the ymm int16 one, its products in
    the VEX form of ``vpdpwssd`` and no zmm register."""
    pytest.importorskip("numba")
    from minivq.kernels.simd import target_features
    if "+avxvnni" not in target_features():
        pytest.skip("this CPU has no AVX-VNNI to run the held code")
    check = ("import numba, numpy as np; from minivq.kernels import nearest_screened, nearest_int16 as V; "
             "assert nearest_screened.screen_name() == 'vnni-256'; "
             "assert V.compiled_products() == ['vnni-256', 'madd-256']; "
             "f = numba.njit(V.block_calls['vnni-256'].py_func); q = np.zeros((8, 4), np.int16); "
             "f(q, np.zeros((2, 2, 16, 2), np.int16), np.ones(8, np.float32), np.empty((32, 32), np.float32)); "
             "asm = f.inspect_asm(f.signatures[0]); "
             "assert '{vex}' in asm and 'vpdpwssd' in asm and 'ymm' in asm and 'zmm' not in asm")
    done = subprocess.run(["bash", os.path.join(BENCH, "as_avx2.sh"), "--vnni", sys.executable, "-c", check],
                          capture_output=True, text=True, timeout=300, cwd=os.path.join(BENCH, os.pardir))
    assert done.returncode == 0, done.stderr[-2000:]


def test_amx_peak_measures_every_peak_the_cpu_has(tmp_path):
    pytest.importorskip("numba")
    pytest.importorskip("threadpoolctl")
    out = tmp_path / "peak.json"
    done = subprocess.run([sys.executable, os.path.join(BENCH, "amx_peak.py"), "--seconds", "0.02", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rates = json.loads(out.read_text())["flops_per_s"]
    assert rates["fma-float32"] > 0 and rates["sgemm"] > 0
    from minivq.kernels import amx, nearest_int16, simd
    assert (rates["amx-bf16"] is not None) == amx.available()
    assert ("no AMX here" in done.stdout) == (not amx.available())
    here = nearest_int16.compiled_products()
    for product in simd.PRODUCTS:
        assert (rates[f"int16-{product}"] is not None) == (product in here)
    assert done.stdout.count("not on this CPU") == len(simd.PRODUCTS) - len(here)


def test_amx_peak_keeps_its_fma_chains_in_registers():
    """The FMA peak is a peak only while every chain stays in a register: no vector instruction of the loop
    may read or write the stack (with AVX2, 256 chains spilled and measured 35 of 90 GF/s on a Zen 3)."""
    pytest.importorskip("numba")
    sys.path.insert(0, BENCH)
    try:
        import amx_peak
    finally:
        sys.path.remove(BENCH)
    multiply_adds, chains = amx_peak.fma_kernel()
    asm = multiply_adds.inspect_asm(multiply_adds.signatures[0])
    spills = [line for line in asm.splitlines() if re.search(r"\b[yz]mm\d", line) and "(%rsp)" in line]
    assert chains >= 96 and not spills, spills[:5]


def test_bench_quantizer_names_the_screen_and_checks_it_against_the_fused_kernel(tmp_path):
    """A tiny sweep: the screen that ran is printed and recorded (``machine.screen``), and where one runs the
    fused kernel is timed beside it and their indices compared per case."""
    pytest.importorskip("numba")
    from minivq.kernels import nearest_screened
    out = tmp_path / "quantizer.json"
    done = subprocess.run([sys.executable, os.path.join(BENCH, "bench_quantizer.py"), "--n", "1000", "--k", "40",
                           "--d", "12", "--repeats", "1", "--pause", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    screen = nearest_screened.screen_name()
    assert record["machine"]["screen"] == screen
    assert f"minivq-numba's screen here: {screen or 'none (the fused kernel alone)'}" in done.stdout
    (case,) = record["cases"]
    if screen is not None:
        assert case["screen_equals_fused"] is True and "minivq-numba-fp32" in case["results"]


def test_bench_quantizer_prices_a_repeat_after_the_warm_up(monkeypatch):
    """A first call that compiles for seconds must not cut a case's repeats: they are priced by the calls
    after it (Zen 5 once got three repeats out of a 20 s budget that way, benchmarks/NOTES.md round 14)."""
    import argparse
    import time

    import numpy as np
    monkeypatch.syspath_prepend(BENCH)
    import bench_quantizer

    def prepare(x, e):
        first = [True]

        def call():
            if first[0]:
                first[0] = False
                time.sleep(0.4)                   # the compile
            return np.argmin((e * e).sum(1) - 2 * x @ e.T, axis=1)
        return call
    impl = bench_quantizer.Impl("compiles-first", "minivq", prepare)
    args = argparse.Namespace(repeats=4, case_seconds=0.5, pause=0.0, device="cpu", max_scores_gb=1.0)
    case = bench_quantizer.run_case([impl], 200, 16, 8, args, peak=1.0)
    assert case["repeats"] == 4 and len(case["results"]["compiles-first"]["times_s"]) == 4
    assert case["results"]["compiles-first"]["warmup_s"] >= 0.4
    args.case_seconds = 1e-6                      # nothing fits: still one repeat
    assert bench_quantizer.run_case([impl], 200, 16, 8, args, peak=1.0)["repeats"] == 1


def test_the_machine_record_names_the_cpu_beyond_its_marketing_name(monkeypatch):
    """A VM may call a Zen 4 and a Zen 5 alike ("AMD EPYC"): the record keeps family, model and stepping
    from /proc/cpuinfo where there is one, and the integer dot-product features the screens rest on."""
    monkeypatch.syspath_prepend(BENCH)
    import _machine
    machine = _machine.describe_machine()
    assert {"cpu_identity", "int_dot_flags"} <= set(machine)
    assert set(machine["int_dot_flags"]) <= _machine.INT_DOT_FLAGS
    if os.path.exists("/proc/cpuinfo") and machine["avx2"]:           # an x86 Linux machine
        assert machine["cpu_identity"]["family"].isdigit() and machine["cpu_identity"]["vendor"]
    json.dumps(machine)                                                # JSON-able as it stands


def test_the_conv_ablation_runs_every_switch_and_puts_each_back(monkeypatch):
    """``bench_conv.py --ablate``: every optimisation it names can be switched off and is restored after (it
    once read a constant that had moved to kernels/windows_numpy.py, and failed before timing anything)."""
    sys.path.insert(0, BENCH)
    try:
        import bench_conv
    finally:
        sys.path.remove(BENCH)
    from minivq.functional import conv as conv_module
    from minivq.kernels import windows_numpy
    monkeypatch.delenv("MINIVQ_NUMBA_WINOGRAD", raising=False)
    before = (conv_module._flipped_geometry, windows_numpy.COL2IM_BLOCK_BYTES, conv_module._im2col_pass)
    for name in bench_conv.ABLATIONS:
        with bench_conv.ablation(name):
            assert (os.environ.get("MINIVQ_NUMBA_WINOGRAD") == "0") == (name == "no-winograd")
        assert (conv_module._flipped_geometry, windows_numpy.COL2IM_BLOCK_BYTES, conv_module._im2col_pass) == before
        assert "MINIVQ_NUMBA_WINOGRAD" not in os.environ
    done = subprocess.run([sys.executable, os.path.join(BENCH, "bench_conv.py"), "--ablate", "wall", "--batches", "2",
                           "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    header = next(line for line in done.stdout.splitlines() if line.startswith("layer"))
    assert header.split()[1:] == bench_conv.ABLATIONS
