"use strict";
// bnlab explain: every step of BN is affine in the input, step(x) = a x + b (see
// bnlab/explain/__init__.py). The page moves bnlab's histogram and statistics of the input
// through those maps; it computes no statistics of its own.
(function () {
  const $ = (id) => document.getElementById(id);
  const fmt = (v, digits = 4) =>
    (Number.isFinite(v) ? String(Number(v.toPrecision(digits))) : String(v));
  const state = { channel: DATA.default_channel, size: DATA.default_size, gamma: 1, beta: 0,
                  logeps: Math.round(Math.log10(DATA.eps)), mode: "train" };
  const charts = {};

  function barChart(id, color) {
    return new Chart($(id), {
      type: "bar",
      data: { labels: [], datasets: [{ data: [], backgroundColor: color, borderWidth: 0,
                                       barPercentage: 1.0, categoryPercentage: 1.0 }] },
      options: { animation: false, responsive: true, maintainAspectRatio: false,
                 plugins: { legend: { display: false }, tooltip: { enabled: true } },
                 scales: { x: { ticks: { maxTicksLimit: 5, maxRotation: 0 } },
                           // log counts: most pixels are background, one bin would hide the rest
                           y: { type: "logarithmic", ticks: { maxTicksLimit: 4 },
                                title: { display: true, text: "count (log)" } } } },
    });
  }

  function lineChart(id, xTitle, yTitle) {
    return new Chart($(id), {
      type: "line",
      data: { datasets: [] },
      options: { animation: false, responsive: true, maintainAspectRatio: false, parsing: false,
                 elements: { point: { radius: 0 } },
                 scales: { x: { type: "linear", title: { display: true, text: xTitle } },
                           y: { title: { display: true, text: yTitle } } } },
    });
  }

  // the histogram of a * x + b, from the input's counts over [edges[0], edges[1]]
  function histogram(s, a, b) {
    const n = s.counts.length, w = (s.edges[1] - s.edges[0]) / n;
    let labels = [], counts = [];
    for (let i = 0; i < n; i++) {
      labels.push(fmt(a * (s.edges[0] + (i + 0.5) * w) + b, 3));
      counts.push(s.counts[i]);
    }
    if (a < 0) { labels.reverse(); counts.reverse(); }
    return { labels, counts };
  }

  // mean, variance, min and max of a * x + b, from the input's
  function moved(s, a, b) {
    const lo = a * s.min + b, hi = a * s.max + b;
    return { mean: a * s.mean + b, var: a * a * s.var, min: Math.min(lo, hi), max: Math.max(lo, hi) };
  }

  function showNumbers(figure, prefix, nums, names) {
    const dl = document.querySelector(`#${figure} dl.numbers`);
    dl.textContent = "";
    for (const [key, label] of names) {
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      dd.id = `${prefix}-${key}`;
      dd.dataset.value = String(nums[key]);
      dd.textContent = fmt(nums[key]);
      dl.append(dt, dd);
    }
  }

  const STAT_NAMES = [["mean", "mean"], ["var", "variance"], ["min", "min"], ["max", "max"]];

  // the four maps (a, b) with statistics (mu, variance)
  function maps(mu, variance, eps, gamma, beta) {
    const inv = 1 / Math.sqrt(variance + eps);
    return [[1, 0], [1, -mu], [inv, -mu * inv], [gamma * inv, beta - gamma * mu * inv]];
  }

  function update() {
    const s = DATA.batches[String(state.size)][state.channel];
    const eps = Math.pow(10, state.logeps);
    const train = state.mode === "train";
    const mu = train ? s.mean : DATA.running.mean[state.channel];
    const v = train ? s.var : DATA.running.var[state.channel];
    const m = maps(mu, v, eps, state.gamma, state.beta);
    m.forEach(([a, b], k) => {
      const h = histogram(s, a, b);
      const chart = charts[`step${k + 1}`];
      chart.data.labels = h.labels;
      chart.data.datasets[0].data = h.counts;
      chart.update("none");
      showNumbers(`step${k + 1}`, `step${k + 1}`, moved(s, a, b), STAT_NAMES);
    });
    // evaluation against training: the same input through the running and the batch maps
    const [at, bt] = maps(s.mean, s.var, eps, state.gamma, state.beta)[3];
    const [ae, be] = maps(DATA.running.mean[state.channel], DATA.running.var[state.channel],
                          eps, state.gamma, state.beta)[3];
    const da = ae - at, db = be - bt;
    const maxDiff = Math.max(Math.abs(da * s.min + db), Math.abs(da * s.max + db));
    const meanDiff = da * s.mean + db;
    $("difference").innerHTML =
      `Evaluation uses the running averages (&mu; = ${fmt(DATA.running.mean[state.channel])}, ` +
      `&sigma;&sup2; = ${fmt(DATA.running.var[state.channel])}, after ${DATA.running.batches} ` +
      `batches of 64 with momentum ${DATA.running.momentum}) instead of this batch's ` +
      `(&mu; = ${fmt(s.mean)}, &sigma;&sup2; = ${fmt(s.var)}). For the same input, the outputs ` +
      `differ by <b id="diff-max" data-value="${maxDiff}">${fmt(maxDiff)}</b> at most and by ` +
      `<b id="diff-mean" data-value="${meanDiff}">${fmt(meanDiff)}</b> on average ` +
      `(evaluation minus training). Small batches make the two disagree more.`;
    $("mode-note").textContent = train
      ? `Training: μ and σ² are this batch's own (${state.size} digits × 28 × 28 = ` +
        `${state.size * 784} values per channel).`
      : `Evaluation: μ and σ² are the running averages, the same for every batch, so the ` +
        `output no longer has mean β and variance γ² exactly.`;
    // the contrast: fixed scalings of the same values (bnlab's numbers)
    const sd = Math.sqrt(s.var);
    const z = histogram(s, 1 / sd, -s.mean / sd);
    charts.z.data.labels = z.labels; charts.z.data.datasets[0].data = z.counts; charts.z.update("none");
    showNumbers("zscore", "zscore", s.zscore, STAT_NAMES);
    const r = s.max - s.min;
    const mm = histogram(s, 1 / r, -s.min / r);
    charts.mm.data.labels = mm.labels; charts.mm.data.datasets[0].data = mm.counts; charts.mm.update("none");
    showNumbers("minmax", "minmax", s.minmax, STAT_NAMES);
    noise();
    $("gamma-out").textContent = fmt(state.gamma);
    $("beta-out").textContent = fmt(state.beta);
    $("eps-out").textContent = `1e${state.logeps}`;
    $("logeps").setAttribute("aria-valuetext", `1e${state.logeps}`);
    $("channel-name").textContent = String(state.channel);
    drawSamples();
  }

  // batch mean and variance by batch size, against the running averages
  function noise() {
    const c = state.channel, rows = DATA.sizes.map((b) => [b, DATA.batches[String(b)][c]]);
    const flat = (v) => DATA.sizes.map((b) => ({ x: b, y: v }));
    charts.noise.data.datasets = [
      { label: "batch mean", yAxisID: "y", borderColor: "#2563eb", pointRadius: 3,
        data: rows.map(([b, s]) => ({ x: b, y: s.mean })) },
      { label: "running mean", yAxisID: "y", borderColor: "#2563eb", borderDash: [6, 4],
        pointRadius: 0, data: flat(DATA.running.mean[c]) },
      { label: "batch variance", yAxisID: "y1", borderColor: "#c2410c", pointRadius: 3,
        data: rows.map(([b, s]) => ({ x: b, y: s.var })) },
      { label: "running variance", yAxisID: "y1", borderColor: "#c2410c", borderDash: [6, 4],
        pointRadius: 0, data: flat(DATA.running.var[c]) },
    ];
    charts.noise.update("none");
  }

  function drawSamples() {
    const box = $("samples");
    const [n, h, w] = DATA.sample_shape;
    const shown = Math.min(n, state.size);
    $("batch-note").textContent = `${state.size} digits from the embedded MNIST sample` +
      (shown < state.size ? ` (the first ${shown} shown)` : "") + ".";
    if (box.childElementCount === shown) return;
    box.textContent = "";
    const bytes = Uint8Array.from(atob(DATA.samples), (c) => c.charCodeAt(0));
    for (let i = 0; i < shown; i++) {
      const c = document.createElement("canvas");
      c.width = w; c.height = h;
      c.setAttribute("role", "img");
      c.setAttribute("aria-label", `digit ${i + 1} of the batch`);
      const ctx = c.getContext("2d"), img = ctx.createImageData(w, h);
      for (let p = 0; p < h * w; p++) {
        const v = 255 - bytes[i * h * w + p];
        img.data.set([v, v, v, 255], 4 * p);
      }
      ctx.putImageData(img, 0, 0);
      box.append(c);
    }
  }

  function network() {
    const ol = $("network");
    for (const layer of DATA.network) {
      const li = document.createElement("li");
      if (layer.bn) li.className = "bn";
      li.textContent = layer.kind;
      const shape = document.createElement("span");
      shape.className = "shape";
      shape.textContent = layer.shape.join("×");
      li.append(shape);
      ol.append(li);
    }
  }

  function runCurves() {
    if (!DATA.run) return;
    $("run-section").hidden = false;
    $("run-title").textContent = `Training curves: ${DATA.run.title}`;
    const palette = ["#c2410c", "#2563eb", "#059669", "#7c3aed", "#db2777", "#0891b2"];
    const points = ([xs, ys]) => xs.map((x, j) => ({ x, y: ys[j] }));
    const runs = Object.entries(DATA.run.curves);
    const add = (chart, key, width) => runs.forEach(([name, c], i) => {
      if (c[key]) chart.data.datasets.push({ label: name, borderColor: palette[i % palette.length],
                                             borderWidth: width, data: points(c[key]) });
    });
    const loss = lineChart("chart-loss", "step", "training loss");
    const acc = lineChart("chart-acc", "step", "test accuracy");
    add(loss, "loss", 1.5); add(acc, "accuracy", 2);
    loss.update(); acc.update();
    if (runs.some(([, c]) => c.percentiles)) {  // Figure 1: a sigmoid input's percentiles
      $("percentiles-figure").hidden = false;
      const pc = lineChart("chart-pct", "step", "input to a sigmoid");
      runs.forEach(([name, c], i) => Object.entries(c.percentiles || {}).forEach(([q, xy]) =>
        pc.data.datasets.push({ label: `${name} ${q}th percentile`, borderWidth: 1.5,
                                borderColor: palette[i % palette.length], data: points(xy) })));
      pc.update();
    }
  }

  function setup() {
    const channel = $("channel"), batch = $("batch");
    for (let c = 0; c < DATA.channels; c++) channel.add(new Option(`channel ${c}`, String(c)));
    for (const b of DATA.sizes) batch.add(new Option(`${b} digits`, String(b)));
    channel.value = String(state.channel);
    batch.value = String(state.size);
    $("logeps").value = String(state.logeps);
    channel.addEventListener("change", () => { state.channel = Number(channel.value); update(); });
    batch.addEventListener("change", () => { state.size = Number(batch.value); update(); });
    for (const key of ["gamma", "beta", "logeps"]) {
      $(key).addEventListener("input", () => { state[key] = Number($(key).value); update(); });
    }
    document.querySelectorAll('input[name="mode"]').forEach((radio) =>
      radio.addEventListener("change", () => { state.mode = radio.value; update(); }));
    const orange = "rgba(194, 65, 12, 0.75)", blue = "rgba(37, 99, 235, 0.7)";
    for (let k = 1; k <= 4; k++) charts[`step${k}`] = barChart(`chart${k}`, k === 4 ? orange : blue);
    charts.noise = new Chart($("chart-noise"), {
      type: "line", data: { datasets: [] },
      options: { animation: false, responsive: true, maintainAspectRatio: false, parsing: false,
                 scales: { x: { type: "logarithmic", title: { display: true, text: "batch size" },
                                afterBuildTicks: (axis) => { axis.ticks = DATA.sizes.map((v) => ({ value: v })); },
                                ticks: { callback: (v) => String(v) } },
                           y: { position: "left", title: { display: true, text: "mean" } },
                           y1: { position: "right", grid: { drawOnChartArea: false },
                                 title: { display: true, text: "variance" } } } },
    });
    charts.z = barChart("chart-z", "rgba(82, 96, 109, 0.7)");
    charts.mm = barChart("chart-mm", "rgba(82, 96, 109, 0.7)");
    network();
    runCurves();
    update();
    document.body.dataset.ready = "true";
  }

  setup();
})();
