// The fleet's charts (uPlot): one line per model, the last 15 minutes, read from /api/series every few seconds.
"use strict";
(function () {
  const root = document.getElementById("charts");
  if (!root || !window.uPlot) return;
  const REFRESH_MS = 5000, WINDOW_S = 900;
  // Okabe–Ito: told apart with the common kinds of colour blindness
  const COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"];
  const CHARTS = {
    rps: {series: [["rps", ""]], unit: "req/s"},
    ttft: {series: [["ttft_p50", " p50", [4, 4]], ["ttft_p95", " p95"]], unit: "ms"},
    queue: {series: [["queue", ""]], unit: "waiting"},
    tps: {series: [["tps", ""]], unit: "tok/s"},
  };
  const plots = {};
  let shape = "";

  function legend(models) {
    const list = document.getElementById("chart-legend");
    list.replaceChildren(...models.map((model, i) => {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = COLORS[i % COLORS.length];
      item.append(swatch, document.createTextNode(model));
      return item;
    }));
  }

  function build(models, data) {
    legend(models);
    for (const [name, chart] of Object.entries(CHARTS)) {
      const holder = root.querySelector(`[data-chart="${name}"] .plot`);
      if (plots[name]) plots[name].destroy();
      const series = [{}];
      models.forEach((model, i) => chart.series.forEach(([, suffix, dash]) => series.push({
        label: model + suffix, stroke: COLORS[i % COLORS.length], width: 2, dash: dash, spanGaps: false,
        value: (u, v) => v == null ? "–" : `${v} ${chart.unit}`,
      })));
      const options = {
        width: Math.max(240, holder.clientWidth), height: 180, series: series,
        axes: [{}, {size: 56, values: (u, ticks) => ticks.map(t => +t.toFixed(2))}],
        // always the whole window, the newest round at the right edge
        scales: {x: {time: true, range: (u, min, max) => [max - WINDOW_S, max]},
                 y: {range: (u, min, max) => [0, Math.max(1, max * 1.1)]}},
        legend: {show: false},
      };
      plots[name] = new uPlot(options, columns(models, data, chart), holder);
    }
  }

  function columns(models, data, chart) {
    const out = [data.t];
    models.forEach(model => chart.series.forEach(([key]) => out.push(data.models[model][key])));
    return out;
  }

  async function refresh() {
    try {
      const response = await fetch(root.dataset.series, {headers: {Accept: "application/json"}});
      if (!response.ok) throw new Error(response.status);
      const data = await response.json();
      const models = Object.keys(data.models).sort();
      if (models.join("\n") !== shape) {
        shape = models.join("\n");
        build(models, data);
      } else {
        for (const [name, chart] of Object.entries(CHARTS)) plots[name].setData(columns(models, data, chart));
      }
      root.classList.remove("stale");
      root.dataset.rounds = String(data.t.length);
    } catch (e) {
      root.classList.add("stale");
    }
  }

  window.addEventListener("resize", () => {
    for (const [name, plot] of Object.entries(plots)) {
      const holder = root.querySelector(`[data-chart="${name}"] .plot`);
      plot.setSize({width: Math.max(240, holder.clientWidth), height: 180});
    }
  });
  refresh();
  setInterval(refresh, REFRESH_MS);
})();
