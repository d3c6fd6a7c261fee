"""benchmarks/cpu_check.py: the runs it plans, the CPU kinds it names, the targets it reads back, and that it
never overwrites a record."""
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
sys.path.insert(0, os.path.abspath(BENCH))
import cpu_check  # noqa: E402


def machine(vendor, family, model, avx512=False, avx2=True):
    return {"cpu_identity": {"vendor": vendor, "family": str(family), "model": str(model)},
            "avx512": avx512, "avx2": avx2}


@pytest.mark.parametrize("identity, name", [
    (machine("AuthenticAMD", 25, 1), "zen3"),                  # Milan
    (machine("AuthenticAMD", 25, 0x21), "zen3"),               # Vermeer
    (machine("AuthenticAMD", 25, 17, avx512=True), "zen4"),    # Genoa
    (machine("AuthenticAMD", 25, 0x61, avx512=True), "zen4"),  # Raphael
    (machine("AuthenticAMD", 26, 2, avx512=True), "zen5"),
    (machine("AuthenticAMD", 23, 49), "zen2"),
    (machine("GenuineIntel", 6, 143, avx512=True), "intel-avx512"),
    (machine("GenuineIntel", 6, 151), "intel-avx2"),
    ({"cpu_identity": {}, "avx512": False, "avx2": False}, "cpu-x86"),
])
def test_the_cpu_kind_comes_from_vendor_family_and_model(identity, name):
    assert cpu_check.cpu_name(identity) == name


def test_openblas_gets_its_avx512_kernels_only_where_haswell_is_pinned_on_an_avx512_cpu():
    avx512, avx2 = machine("AuthenticAMD", 26, 2, avx512=True), machine("AuthenticAMD", 25, 1)
    assert cpu_check.bench_env(avx512, {"OPENBLAS_CORETYPE": "Haswell"})["OPENBLAS_CORETYPE"] == "SkylakeX"
    assert cpu_check.bench_env(avx2, {"OPENBLAS_CORETYPE": "Haswell"})["OPENBLAS_CORETYPE"] == "Haswell"
    assert "OPENBLAS_CORETYPE" not in cpu_check.bench_env(avx512, {"PATH": "/bin"})
    environ = {"OPENBLAS_CORETYPE": "Haswell"}
    cpu_check.bench_env(avx512, environ)
    assert environ == {"OPENBLAS_CORETYPE": "Haswell"}          # the caller's environment is left alone


def test_the_plan_runs_every_target_on_all_cores_and_on_one_each_into_its_own_file(tmp_path):
    runs = cpu_check.plan("zen4", "2026-12-02", "run2", str(tmp_path))
    paths = [r[4] for r in runs]
    assert len(set(paths)) == len(paths) == 8
    assert all(os.path.dirname(p) == str(tmp_path) and "-cpu-zen4-" in os.path.basename(p) for p in paths)
    assert all("-2026-12-02-run2.json" in p for p in paths)
    for label, argv, extra, limit, path in runs:
        one = "one thread" in label
        assert ("-1thread-" in path) == one
        assert path in argv and limit > 0
        if one:         # held to one thread: by the script's own option, or the environment for bench_conv
            assert ("--threads" in argv and argv[argv.index("--threads") + 1] == "1") or \
                extra == {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    scripts = {os.path.basename(a) for r in runs for a in r[1] if a.endswith(".py")}
    assert scripts == {"bench_train_step.py", "bench_quantizer.py", "profile_step.py", "bench_conv.py"}
    search = next(r[1] for r in runs if r[0] == "nearest code, all cores")
    assert search[search.index("--k") + 1:search.index("--k") + 3] == ["512", "4096"]


def test_on_an_avx512_cpu_the_one_thread_step_runs_with_the_avx2_tiles_too(tmp_path):
    plain = cpu_check.plan("zen4", "2026-12-02", "", str(tmp_path))
    runs = cpu_check.plan("zen4", "2026-12-02", "", str(tmp_path), avx512=True)
    extra = [r for r in runs if r not in plain]
    assert len(runs) == len(plain) + 1 and len(extra) == 1
    label, argv, env, _, path = extra[0]
    assert env == {"MINIVQ_NUMBA_WIDE": "0"} and os.path.basename(path) == "train-step-cpu-zen4-1thread-narrow-2026-12-02.json"
    assert argv[argv.index("--threads") + 1] == "1" and path in argv
    record = step_record(1, [{"model": "vqvae", "batch": 128, "ratio": 0.98}])
    record["machine"] = {"isa_env": {"MINIVQ_NUMBA_WIDE": "0"}}
    (row,) = cpu_check.target_rows([record])
    assert row[0] == "VQ-VAE step, batch 128 (MINIVQ_NUMBA_WIDE=0): <= 1.00x PyTorch" and row[3] is True


def step_record(threads, rows):
    return {"benchmark": "train_step", "device": "cpu", "threads": threads, "rows": rows}


def test_the_targets_table_says_which_target_was_missed():
    records = [
        step_record(1, [{"model": "vqvae", "batch": 128, "ratio": 1.02},
                        {"model": "vqvae", "batch": 32, "ratio": 0.97}]),
        step_record(2, [{"model": "prior", "batch": 64, "ratio": 0.80, "workers_ratio": 0.70},
                        {"model": "vqvae", "batch": 32, "ratio": None}]),
        {"benchmark": "nearest-code search (bench_quantizer.py)", "device": "cpu", "threads": 2, "cases": [
            {"n": 65536, "k": 512, "d": 64, "results": {
                "minivq-numba": {"median_s": 0.010, "share_of_sgemm_peak": 0.9}, "faiss": {"median_s": 0.020}}},
            {"n": 65536, "k": 4096, "d": 256, "results": {
                "minivq-numba": {"median_s": 0.010, "share_of_sgemm_peak": 0.9}, "faiss": {"median_s": 0.012}}},
            {"n": 65536, "k": 4096, "d": 64, "results": {
                "minivq-numba": {"median_s": 0.010, "share_of_sgemm_peak": 0.9}}}]},
        {"benchmark": "profile_step", "rows": []},                  # bears on no target
    ]
    rows = {(what, threads): (text, met) for what, threads, text, met in cpu_check.target_rows(records)}
    assert rows[("VQ-VAE step, batch 128: <= 1.00x PyTorch", 1)] == ("1.02x", False)
    assert rows[("VQ-VAE step, batch 32: <= 1.00x PyTorch", 1)] == ("0.97x", True)
    assert rows[("VQ-VAE step, batch 32: <= 1.00x PyTorch", 2)] == ("no PyTorch", None)
    assert rows[("prior step, batch 64: <= 1.00x PyTorch", 2)] == ("0.80x (workers 0.70x) stretch", True)
    assert rows[("nearest code N=65536 K=512 D=64: >= 1.25x faiss", 2)] == ("2.00x (90% of SGEMM)", True)
    assert rows[("nearest code N=65536 K=4096 D=256: >= 1.25x faiss", 2)][1] is False      # 1.20x
    assert rows[("nearest code N=65536 K=4096 D=64: >= 1.25x faiss", 2)] == ("no faiss", None)
    assert len(rows) == 7
    assert cpu_check.print_targets(cpu_check.target_rows(records)) == 2


def test_it_never_overwrites_a_record_and_a_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "results"
    assert cpu_check.main(["--dry-run", "--name", "zen9", "--out", str(out)]) == 0
    assert not out.exists()
    assert capsys.readouterr().out.count("--out " + str(out)) == 7        # profile_step names its file --json
    out.mkdir()
    first = cpu_check.plan("zen9", cpu_check.describe_machine()["date"][:10], "", str(out))[0][4]
    with open(first, "w") as f:
        f.write("a user's record")
    assert cpu_check.main(["--name", "zen9", "--out", str(out)]) == 2
    assert "pass --tag" in capsys.readouterr().err
    assert open(first).read() == "a user's record" and os.listdir(out) == [os.path.basename(first)]
    assert cpu_check.main(["--name", "zen 9", "--out", str(out)]) == 2


@pytest.mark.slow
def test_the_quick_check_runs_every_benchmark_and_reads_their_records(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(BENCH, "cpu_check.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(os.listdir(tmp_path)) == 8
    for name in os.listdir(tmp_path):
        with open(tmp_path / name) as f:
            assert json.load(f)
    for target in ("VQ-VAE step, batch 2: <= 1.00x PyTorch", "prior step, batch 2: <= 1.00x PyTorch",
                   "nearest code N=512 K=16 D=8: >= 1.25x faiss"):
        assert target in done.stdout          # a row each, measured or saying which peer is missing


def test_busy_cores_counts_the_cores_in_use_now():
    busy = cpu_check.busy_cores(0.2)
    if not os.path.exists("/proc/stat"):
        assert busy is None
    else:
        assert 0.0 <= busy <= os.cpu_count()
