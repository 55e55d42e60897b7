"""Plant known bugs one at a time and check that the tests meant to guard against them fail.

Each plant replaces one piece of the source by a wrong one (a bug an issue found, or one a
weak test would miss), runs the tests that guard it, and restores the file. Every line of
the report should say CAUGHT; the exit status is 1 otherwise. Usage, from the repository
root (it takes a few minutes: one plant recompiles a numba kernel):

    .venv/bin/python tools/plant_bugs.py [WORD ...]   # only the plants whose description has WORD
"""

import pathlib
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
F, K = "src/bnlab/functional", "src/bnlab/kernels"

PLANTS = [  # (what, file, correct text, planted text, tests that must fail)
    ("statistics accumulated in float32", f"{F}/_common.py",
     "    acc = _accumulator(x.dtype)\n    mean = x.mean",
     "    acc = _compute_dtype(x.dtype)\n    mean = x.mean",
     "tests/test_accuracy.py tests/test_differential.py tests/test_tensorflow_fixtures.py"),
    ("backward: dbeta summed in float32", f"{F}/batchnorm.py",
     "dbeta = _cast(dyc.sum(axis=reduce_axes, dtype=acc), cdt)",
     "dbeta = _cast(dyc.sum(axis=reduce_axes), cdt)",
     "tests/test_accuracy.py tests/test_differential.py"),
    ("reference: unbiased variance to normalize", f"{F}/batchnorm.py",
     "inv_std = inv_std_of(var, eps, var.dtype)  ",
     "inv_std = inv_std_of(var * m / (m - 1), eps, var.dtype)  ",
     "tests/test_functional.py"),
    ("reference: float16 computed in float16", f"{F}/_common.py",
     "return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)",
     "return np.dtype(dtype)",
     "tests/test_functional.py -k float16"),
    ("NHWC kernel drops beta", f"{K}/numba_bn.py",
     "yr[c] = _act((xr[c] - mu_[c]) * a_[c] + b_[c], relu)",
     "yr[c] = _act((xr[c] - mu_[c]) * a_[c], relu)",
     "tests/test_properties.py"),
    ("no fallback when numba fails to import", f"{K}/__init__.py",
     'warn_once("numba", missing_numba_message())\n                return None\n',
     'warn_once("numba", missing_numba_message())\n',
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
    ("bnlab.torch: NaN batch updates the running statistics", "src/bnlab/torch/engine.py",
     "        if all(np.isfinite(v).all() for _, v, _, _ in terms):", "        if True:",
     "tests/test_torch.py -k nonfinite"),
    ("bnlab.torch: torch's kernel's NaN batch committed", "src/bnlab/torch/engine.py",
     "            if all(bool(torch.isfinite(n).all()) for _, n in pairs):",
     "            if True:",
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
     "    s2 = tl.zeros(cc.shape, dtype=tl.float32)\n    for p0 in range(0, P, PB):",
     "    s2 = tl.zeros(cc.shape, dtype=tl.float32)\n    for p0 in range(0, PB, PB):",
     "tests/test_triton.py -k split"),
    ("triton: only the first chunk of statistics parts merged", "src/bnlab/kernels/triton_bn.py",
     "    m2 = tl.zeros(cc.shape, dtype=tl.float32)\n    for p0 in range(0, P, PB):",
     "    m2 = tl.zeros(cc.shape, dtype=tl.float32)\n    for p0 in range(0, PB, PB):",
     "tests/test_triton.py -k split"),
    ("triton: Chan's merge without the between-parts term", "src/bnlab/kernels/triton_bn.py",
     "return n, mu_a + delta * w, m2_a + m2_b + delta * delta * n_a * w",
     "return n, mu_a + delta * w, m2_a + m2_b",
     "tests/test_accuracy_engines.py -k merges_parts"),
    ("triton: strided (C,) vectors read as contiguous", "src/bnlab/kernels/triton_bn.py",
     "return t if t is None or t.is_contiguous() else t.contiguous()", "return t",
     "tests/test_accuracy_engines.py -k strided"),
    ("triton: a strided running buffer's update not written back",
     "src/bnlab/kernels/triton_bn.py", "            buf.copy_(k)\n", "            pass\n",
     "tests/test_accuracy_engines.py -k strided"),
    ("engine: a forced backend hands the call to torch", "src/bnlab/torch/engine.py",
     "        raise kind(f'backend=\"{backend}\" {why}')", '        return "native"',
     "tests/test_engine_matrix.py -k forced"),
    ("engine: auto skips bnlab's kernels", "src/bnlab/torch/engine.py",
     "        for rule in RULES[:2]:", "        for rule in RULES[:0]:",
     "tests/test_engine_matrix.py -k BatchNorm2d-auto-f32"),
    ("engine: kernels run under torch.func transforms", "src/bnlab/torch/engine.py",
     '            return "native" if update and mask is None else "reference"',
     '            return "numba" if x.device.type == "cpu" else "triton"',
     "tests/test_torch_derivatives.py -k transforms"),
    ("engine: eps <= 0 accepted in training", "src/bnlab/torch/engine.py",
     "    if training and not eps > 0:", "    if False:",
     "tests/test_engine_matrix.py -k eps"),
    ("double backward: the kernels' first derivative, detached", "src/bnlab/torch/_ops.py",
     "    if graph_wanted(dy):\n        dx, dgamma, dbeta = reference.grads(\n",
     "    if False:\n        dx, dgamma, dbeta = reference.grads(\n",
     "tests/test_torch_derivatives.py -k penalty"),
    ("outputs in NumPy-owned storage", "src/bnlab/torch/_ops.py",
     "    y = OUTPUTS.empty(x.shape, x.dtype, fmt)\n",
     "    y = torch.from_numpy(np.empty(x.shape, np.dtype(str(x.dtype)[6:]))).contiguous("
     "memory_format=fmt)\n",
     "tests/test_torch_derivatives.py -k ordinary"),
    ("numba views made with .numpy() (storage no longer resizable)", "src/bnlab/torch/_ops.py",
     "        return _view(t), 1\n", "        return t.numpy(), 1\n",
     "tests/test_torch_derivatives.py -k ordinary"),
    ("output memory reused while something still holds it", "src/bnlab/torch/_ops.py",
     "torch._C._storage_Use_Count(storage._cdata) == 1:",
     "torch._C._storage_Use_Count(storage._cdata) >= 1:",
     "tests/test_torch_derivatives.py -k reused_only_once"),
    ("resnet50: the stride on the bottleneck's 1x1 (v1) instead of its 3x3 (v1.5)",
     "src/bnlab/torch/models.py",
     "        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)\n        self.bn1 = nn.BatchNorm2d(planes)\n        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)",
     "        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride, bias=False)\n        self.bn1 = nn.BatchNorm2d(planes)\n        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)",
     "tests/test_resnets.py"),
    ("mask: NaN in padding reaches the statistics", "src/bnlab/torch/reference.py",
     "    mean = torch.where(keep, xc, zero).sum(dims) / count",
     "    mean = (xc * keep).sum(dims) / count",
     "tests/test_variants.py -k padding"),
    ("fold_batchnorm: a conv called twice folded twice", "src/bnlab/torch/variants.py",
     "            and calls[prev.target] == 1\n            and calls[node.target] == 1\n", "",
     "tests/test_variants.py -k twice"),
    ("renorm: the renorm averages outside the guard", "src/bnlab/torch/variants.py",
     "            extra=((self.renorm_mean, mean, w), (self.renorm_std, torch.from_numpy(sigma_b), "
     "w)),\n        )\n",
     "        )\n        with torch.no_grad():\n"
     "            self.renorm_mean.mul_(1 - w).add_(w * mean.to(self.renorm_mean))\n"
     "            self.renorm_std.mul_(1 - w).add_(w * torch.from_numpy(sigma_b).to("
     "self.renorm_std))\n",
     "tests/test_engine_matrix.py -k BatchRenorm2d-auto-f32-contiguous"),
    ("triton: NaN batch updates the running statistics", "src/bnlab/kernels/triton_bn.py",
     "other=0)) == 0\n", "other=0)) >= 0\n", "tests/test_triton.py -k nonfinite"),
    ("sync BN: backward sums not all-reduced", "src/bnlab/torch/sync.py",
     "        dist.all_reduce(sums, group=ctx.group)\n", "",
     "tests/test_distributed.py -k whole_batch"),
    ("sync BN: running variance unbiased with the local count", "src/bnlab/torch/sync.py",
     "engine.update_running(running_mean, running_var, nbt, mean, var, n, momentum)",
     "engine.update_running(running_mean, running_var, nbt, mean, var, max(n_local, 2), "
     "momentum)",
     "tests/test_distributed.py -k whole_batch"),
    ("sync BN: ranks compared only at a rank's first call", "src/bnlab/torch/sync.py",
     "        _check_ranks(input, group)  # every call: any rank may change (module docstring)\n",
     "        if not getattr(self, '_agreed', False):\n            _check_ranks(input, group)\n"
     "            self._agreed = True\n",
     "tests/test_distributed.py -k 'changes_later and not dtype'"),
    ("torch training: per-rank mean loss (DDP then averages unequal means)",
     "src/bnlab/experiments/torch_train.py", "(loss_sum * (world / B)).backward()",
     "(loss_sum / (hi - lo)).backward()", "tests/test_distributed.py -k nproc_2"),
    ("batch renorm: averages updated before r and d are computed", "src/bnlab/nn/variants.py",
     '        y, cache = F.batch_renorm_forward(\n            x,\n            gamma,\n            beta,\n            self.eps,\n            self.axis,\n            self.renorm_mean,\n            self.renorm_std,\n            self.rmax,\n            self.dmax,\n        )\n        bn = cache.bn\n        F.update_renorm_stats(\n            self.renorm_mean, self.renorm_std, bn.mean, 1.0 / bn.inv_std, self.renorm_momentum\n        )\n',
     '        m0, v0 = F.moments(x, axes=[a for a in range(x.ndim) if a != self.axis % x.ndim])\n        F.update_renorm_stats(\n            self.renorm_mean, self.renorm_std, m0, np.sqrt(v0 + self.eps), self.renorm_momentum\n        )\n        y, cache = F.batch_renorm_forward(\n            x,\n            gamma,\n            beta,\n            self.eps,\n            self.axis,\n            self.renorm_mean,\n            self.renorm_std,\n            self.rmax,\n            self.dmax,\n        )\n        bn = cache.bn\n',
     "tests/test_keras_fixtures.py"),
    ("mask: masked-out positions get the batch-statistics gradient", f"{F}/batchnorm.py",
     "dx = scale * dyc - np.where(cache.mask, through_stats, 0)", "dx = scale * dyc - through_stats",
     "tests/test_variants.py -k mask"),
    ("fused ReLU: backward not gated", "src/bnlab/kernels/numba_bn.py",
     "    return g - g if relu and not (xv - mu) * za + zb > 0 else g",
     "    return g", "tests/test_variants.py -k act"),
    ("BN + add + ReLU: the backward reads the wrong bit of the mask", f"{K}/numba_bn.py",
     "if relu and not (bits[j >> 3] >> (j & 7)) & 1:",
     "if relu and not (bits[j >> 3] >> (j & 6)) & 1:",
     "tests/test_fused.py -k numba"),
    ("BN + add + ReLU: NaN outputs pass no gradient (torch's ReLU passes it)",
     f"{K}/numba_bn.py", "if relu and not v <= 0:", "if relu and v > 0:",
     "tests/test_fused.py -k nan"),
    ("BN + add + ReLU (Triton): the mask's bits not shifted into place",
     f"{K}/triton_bn.py", "byte = tl.sum(on << tl.arange(0, 8)[None, :], axis=1)",
     "byte = tl.sum(on, axis=1)", "tests/test_fused.py -k triton"),
    ("fuse: the residual dropped from BN + add + ReLU", "src/bnlab/torch/fuse.py",
     "fused = gm.graph.call_module(node.target, (node.args[0], other))",
     "fused = gm.graph.call_module(node.target, (node.args[0], node.args[0]))",
     "tests/test_fused.py -k fuse"),
    ("auto on CUDA: Triton whatever the measurements say", "src/bnlab/torch/engine.py",
     "if rule.measured and measured and not faster_on_cuda(training, x):",
     "if rule.measured and measured and False:", "tests/test_engine_auto.py"),
    ("auto on CUDA: a loss above a smaller win ignored", "src/bnlab/torch/engine.py",
     "return bool(below) and below[-1] and (not above or above[0])",
     "return bool(below) and below[-1]", "tests/test_engine_auto.py"),
    ("auto on CUDA: the table not regenerated from the bench run",
     "src/bnlab/torch/measured.py",
     '("train", "channels_last", "float16", 51380224, 1.899)',
     '("train", "channels_last", "float16", 51380224, 0.899)', "tests/test_engine_auto.py"),
    ("BN + add + ReLU: double backward through the kernels' detached gradient",
     "src/bnlab/torch/_ops.py", "        if graph_wanted(dy):  # differentiable",
     "        if False:  # differentiable", "tests/test_fused.py -k second"),
    ("layers: the kernels import the functional layer above them", f"{K}/__init__.py",
     "\nfrom __future__ import annotations\n",
     "\nfrom __future__ import annotations\n\nfrom .. import functional as _above  # noqa\n",
     "tests/test_layout.py -k downward"),
    ("layers: nn reaches into functional's private helpers", "src/bnlab/nn/loss.py",
     'F.check_float(logits, "logits")', 'F._common.check_float(logits, "logits")',
     "tests/test_layout.py -k downward"),
    ("extras: a lab command without its extra ends in a traceback", "src/bnlab/cli.py",
     "    except MissingExtra as e:  # an optional dependency: one line naming the extra\n"
     "        print(f\"bnlab {args.command}: {e}\", file=sys.stderr)\n        return 2\n", "",
     "tests/test_layout.py -k extra"),
    ("convert_weights: Keras's momentum passed to torch as it is",
     f"{F}/keras.py", '        out["momentum"] = 1.0 - m', '        out["momentum"] = m',
     "tests/test_keras_weights.py"),
    ("grader: the unbiased variance not recognised", "src/bnlab/exercises.py",
     "_, uvar = _stats(x, axes, ddof=1)", "_, uvar = _stats(x, axes, ddof=0)",
     "tests/test_exercises.py -k mistake"),
    ("grader: a correct implementation written differently fails", "src/bnlab/exercises.py",
     "return 1e-4 if np.dtype(dtype) == np.float32 else 1e-8",
     "return 1e-4 if np.dtype(dtype) == np.float32 else 1e-16",
     "tests/test_exercises.py -k correct"),
    ("grader: Keras's momentum in the running averages not named", "src/bnlab/exercises.py",
     "if _close(new_rm, momentum * rm + (1 - momentum) * mean, np.float64):",
     "if _close(new_rm, (1 - momentum) * rm + momentum * mean, np.float64):",
     "tests/test_exercises.py -k train_eval"),
    ("lesson: the learner's notebooks ship with the solutions", "tools/build_notebooks.py",
     "            if solutions:\n", "            if True:\n",
     "tests/test_lesson.py -k blanks"),
    ("bnlab lesson: a learner's notebook overwritten", "src/bnlab/cli.py",
     "    if taken and not args.force:", "    if False:", "tests/test_lesson.py -k copies"),
    ("doctor: torch.load may unpickle any object", "src/bnlab/experiments/checkup.py",
     'obj = torch.load(path, map_location="cpu", weights_only=True)',
     'obj = torch.load(path, map_location="cpu", weights_only=False)',
     "tests/test_doctor_cli.py -k pickle"),
    ("doctor: a bias whose output also feeds a sum counts as cancelled",
     "src/bnlab/torch/doctor.py",
     "            and modules[src.target].bias is not None\n            and len(src.users) == 1\n",
     "            and modules[src.target].bias is not None\n",
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
                                *shlex.split(tests)], cwd=ROOT, capture_output=True, text=True)
        finally:
            file.write_text(text)
        summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-200:]
        print(f"{what:45s} -> {'CAUGHT' if r.returncode else 'NOT CAUGHT'}: {summary}")
        missed += r.returncode == 0
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
