"""Plant known bugs one at a time and check that the tests meant to guard against them fail.

Each plant replaces one piece of the source by a wrong one (a bug an issue found, or one a
weak test would miss), runs the tests that guard it, and restores the file. Every line of
the report should say CAUGHT; the exit status is 1 otherwise. Usage, from the repository
root (it takes a few minutes: one plant recompiles a numba kernel):

    .venv/bin/python tools/plant_bugs.py [WORD ...]   # only the plants whose description has WORD
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
F, K = "src/bnlab/functional.py", "src/bnlab/kernels"

PLANTS = [  # (what, file, correct text, planted text, tests that must fail)
    ("statistics accumulated in float32", F,
     "    acc = _accumulator(x.dtype)\n    mean = x.mean",
     "    acc = _compute_dtype(x.dtype)\n    mean = x.mean",
     "tests/test_accuracy.py tests/test_differential.py tests/test_tensorflow_fixtures.py"),
    ("backward: dbeta summed in float32", F,
     "dbeta = _cast(dyc.sum(axis=reduce_axes, dtype=acc), cdt)",
     "dbeta = _cast(dyc.sum(axis=reduce_axes), cdt)",
     "tests/test_accuracy.py tests/test_differential.py"),
    ("reference: unbiased variance to normalize", F,
     "inv_std = inv_std_of(var, eps, var.dtype)  ",
     "inv_std = inv_std_of(var * m / (m - 1), eps, var.dtype)  ",
     "tests/test_functional.py"),
    ("reference: float16 computed in float16", F,
     "return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)",
     "return np.dtype(dtype)",
     "tests/test_functional.py -k float16"),
    ("NHWC kernel drops beta", f"{K}/numba_bn.py",
     "yr[c] = _act((xr[c] - mu_[c]) * a_[c] + b_[c], relu)",
     "yr[c] = _act((xr[c] - mu_[c]) * a_[c], relu)",
     "tests/test_properties.py"),
    ("no fallback when numba fails to import", f"{K}/__init__.py",
     "if isinstance(mod, ImportError) or (dtype", "if (dtype",
     "tests/test_kernels.py -k without_numba"),
    ("BNLAB_NUM_THREADS ignored", f"{K}/numba_bn.py",
     "max_threads: int | None = _threads_from_env()", "max_threads: int | None = None",
     "tests/test_kernels.py -k num_threads"),
    ("bnlab steps: exit status 0 on a mismatch", "src/bnlab/cli.py",
     'return 0 if result["ok"] else 1', "return 0", "tests/test_cli.py -k steps"),
    ("fig1 percentiles of the wrong unit", "src/bnlab/experiments/reproduce.py",
     "float(row[config.unit])", "float(row[0])", "tests/test_reproduce.py -k percentiles"),
    ("bench: mean instead of median", "src/bnlab/bench.py",
     "float(np.median(v))", "float(np.mean(v))", "tests/test_bench.py"),
    ("bench: ratios to torch inverted", "src/bnlab/bench.py",
     'med[f"{op}/{ours}"] / med[f"{op}/{theirs}"]', 'med[f"{op}/{theirs}"] / med[f"{op}/{ours}"]',
     "tests/test_bench.py"),
    ("bnlab.torch: NaN batch updates the running statistics", "src/bnlab/torch/_ops.py",
     "    if not (np.isfinite(mean).all() and np.isfinite(var).all()):\n        return\n", "",
     "tests/test_torch.py -k nonfinite"),
    ("bnlab.torch: torch's thread count ignored", "src/bnlab/torch/_ops.py",
     "Threads(cap=torch.get_num_threads(),", "Threads(cap=None,",
     "tests/test_torch.py -k threads"),
    ("bnlab.torch: eval backward as if batch statistics", "src/bnlab/torch/_ops.py",
     "dx, dweight, dbias = _grads(ctx, dy, False, backward)",
     "dx, dweight, dbias = _grads(ctx, dy, True, backward)",
     "tests/test_torch.py -k gradcheck"),
    ("triton: the mean rounded to float32 before subtracting", "src/bnlab/kernels/triton_bn.py",
     "y = ((x - hi3) - lo3) * scale3 + beta3", "y = (x - (hi3 + lo3)) * scale3 + beta3",
     "tests/test_triton.py -k reference"),
    ("triton: only the first chunk of parts added", "src/bnlab/kernels/triton_bn.py",
     "for p0 in range(0, P, PB):", "for p0 in range(0, PB, PB):",
     "tests/test_triton.py -k split"),
    ("triton: NaN batch updates the running statistics", "src/bnlab/kernels/triton_bn.py",
     "other=0)) == 0\n", "other=0)) >= 0\n", "tests/test_triton.py -k nonfinite"),
    ("sync BN: backward sums not all-reduced", "src/bnlab/torch/sync.py",
     "        dist.all_reduce(sums, group=ctx.group)\n", "",
     "tests/test_distributed.py -k whole_batch"),
    ("sync BN: running variance unbiased with the local count", "src/bnlab/torch/sync.py",
     "engine.update(running_mean, running_var, nbt, mean, var, n, momentum)",
     "engine.update(running_mean, running_var, nbt, mean, var, max(n_local, 2), momentum)",
     "tests/test_distributed.py -k whole_batch"),
    ("torch training: per-rank mean loss (DDP then averages unequal means)",
     "src/bnlab/experiments/torch_train.py", "(loss_sum * (world / B)).backward()",
     "(loss_sum / (hi - lo)).backward()", "tests/test_distributed.py -k nproc_2"),
    ("batch renorm: averages updated before r and d are computed", "src/bnlab/nn/variants.py",
     "        y, cache = F.batch_renorm_forward(x, gamma, beta, self.eps, self.axis,\n"
     "                                          self.renorm_mean, self.renorm_std, self.rmax,\n"
     "                                          self.dmax)\n"
     "        bn = cache.bn\n"
     "        F.update_renorm_stats(self.renorm_mean, self.renorm_std, bn.mean, 1.0 / bn.inv_std,\n"
     "                              self.renorm_momentum)\n",
     "        m0, v0 = F.moments(x, axes=[a for a in range(x.ndim) if a != self.axis % x.ndim])\n"
     "        F.update_renorm_stats(self.renorm_mean, self.renorm_std, m0, np.sqrt(v0 + self.eps),\n"
     "                              self.renorm_momentum)\n"
     "        y, cache = F.batch_renorm_forward(x, gamma, beta, self.eps, self.axis,\n"
     "                                          self.renorm_mean, self.renorm_std, self.rmax,\n"
     "                                          self.dmax)\n"
     "        bn = cache.bn\n",
     "tests/test_keras_fixtures.py"),
    ("mask: masked-out positions get the batch-statistics gradient", "src/bnlab/functional.py",
     "dx = scale * dyc - np.where(cache.mask, through_stats, 0)", "dx = scale * dyc - through_stats",
     "tests/test_variants.py -k mask"),
    ("fused ReLU: backward not gated", "src/bnlab/kernels/numba_bn.py",
     "    return g - g if relu and not (xv - mu) * za + zb > 0 else g",
     "    return g", "tests/test_variants.py -k act"),
    ("doctor: torch.load may unpickle any object", "src/bnlab/experiments/checkup.py",
     'obj = torch.load(path, map_location="cpu", weights_only=True)',
     'obj = torch.load(path, map_location="cpu", weights_only=False)',
     "tests/test_doctor_cli.py -k pickle"),
    ("doctor: a bias whose output also feeds a sum counts as cancelled",
     "src/bnlab/torch/doctor.py",
     "modules[src.target].bias is not None and len(src.users) == 1",
     "modules[src.target].bias is not None",
     "tests/test_doctor.py -k residual"),
    ("explain: step 4 forgets gamma", "src/bnlab/explain/app.js",
     "return [[1, 0], [1, -mu], [inv, -mu * inv], [gamma * inv, beta - gamma * mu * inv]];",
     "return [[1, 0], [1, -mu], [inv, -mu * inv], [inv, beta - mu * inv]];",
     "tests/test_explain.py -k gamma"),
    ("explain: evaluation uses the batch's statistics", "src/bnlab/explain/app.js",
     "const mu = train ? s.mean : DATA.running.mean[state.channel];",
     "const mu = s.mean;", "tests/test_explain.py -k switch"),
    ("explain: the page fetches a script", "src/bnlab/explain/page.html",
     "<script>/*CHARTJS*/</script>",
     '<script src="https://cdn.jsdelivr.net/npm/chart.js"></script><script>/*CHARTJS*/</script>',
     "tests/test_explain.py::test_the_page_is_one_small_self_contained_file"),
]


def main(only=()) -> int:
    """Plant every bug (or those whose description contains one of ``only``)."""
    missed = 0
    for what, path, good, bad, tests in PLANTS:
        if only and not any(word in what for word in only):
            continue
        file = ROOT / path
        text = file.read_text()
        if text.count(good) != 1:
            print(f"{what:45s} -> cannot plant: the text is not in {path} exactly once")
            missed += 1
            continue
        file.write_text(text.replace(good, bad))
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings",
                                *tests.split()], cwd=ROOT, capture_output=True, text=True)
        finally:
            file.write_text(text)
        summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-200:]
        print(f"{what:45s} -> {'CAUGHT' if r.returncode else 'NOT CAUGHT'}: {summary}")
        missed += r.returncode == 0
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
