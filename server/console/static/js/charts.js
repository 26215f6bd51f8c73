// Small hand-drawn SVG charts: a sparkline and a grouped bar chart.

import { svg } from './dom.js';

export function sparkline(values, { width = 240, height = 48, max } = {}) {
  const top = Math.max(max ?? 0, ...values, 1e-9);
  const step = values.length > 1 ? width / (values.length - 1) : width;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 2 - (v / top) * (height - 4)).toFixed(1)}`);
  const chart = svg('svg', { viewBox: `0 0 ${width} ${height}`, class: 'spark', preserveAspectRatio: 'none', role: 'img' });
  chart.append(svg('line', { class: 'base', x1: 0, x2: width, y1: height - 1, y2: height - 1 }));
  if (points.length) {
    chart.append(svg('polygon', { class: 'area', points: `0,${height} ${points.join(' ')} ${((values.length - 1) * step).toFixed(1)},${height}` }));
    chart.append(svg('polyline', { class: 'line', points: points.join(' ') }));
  }
  return chart;
}

const COLORS = 8; // .series-0 ... .series-7 in console.css

// groups: [{label, values: [number|null per series]}]; series: names; values in 0..max.
export function groupedBars(groups, series, { max = 100, height = 220 } = {}) {
  const barWidth = 14;
  const gap = 18;
  const groupWidth = series.length * barWidth + gap;
  const left = 32;
  const width = left + groups.length * groupWidth + gap;
  const plot = height - 40;
  const chart = svg('svg', { viewBox: `0 0 ${width} ${height}`, class: 'bars', role: 'img' });
  for (const tick of [0, 25, 50, 75, 100]) {
    const y = 10 + plot - (tick / max) * plot;
    chart.append(svg('line', { x1: left, x2: width, y1: y, y2: y, class: 'grid' }));
    chart.append(svg('text', { x: left - 4, y: y + 4, class: 'tick', 'text-anchor': 'end', text: String(tick) }));
  }
  groups.forEach((group, g) => {
    const x0 = left + gap / 2 + g * groupWidth;
    group.values.forEach((value, s) => {
      if (value === null || value === undefined) return;
      const h = (value / max) * plot;
      const bar = svg('rect', { x: x0 + s * barWidth, y: 10 + plot - h, width: barWidth - 2, height: Math.max(h, 0.5), class: `series-${s % COLORS}` });
      bar.append(svg('title', { text: `${series[s]} · ${group.label}: ${value.toFixed(1)}` }));
      chart.append(bar);
    });
    chart.append(svg('text', { x: x0 + (series.length * barWidth) / 2, y: height - 14, class: 'label', 'text-anchor': 'middle', text: group.label }));
  });
  return chart;
}

// A loss curve: x the optimizer step, y the loss; one polyline per series (train, valid).
// series: [{name, class, points: [[step, loss], ...]}]. The y axis starts at 0 unless the
// losses sit far above it, so the curve's fall stays visible.
export function lossCurve(series, { width = 480, height = 220, totalSteps } = {}) {
  const left = 44;
  const right = 10;
  const top = 10;
  const bottom = 24;
  const all = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const chart = svg('svg', { viewBox: `0 0 ${width} ${height}`, class: 'loss', role: 'img' });
  const maxX = Math.max(totalSteps || 0, ...all.map(([x]) => x), 1);
  const minX = Math.min(...all.map(([x]) => x), maxX);
  const lo = Math.min(...all.map(([, y]) => y));
  const hi = Math.max(...all.map(([, y]) => y));
  const yMin = all.length ? Math.max(0, lo - (hi - lo) * 0.1 - 1e-6) : 0;
  const yMax = all.length ? hi + (hi - lo) * 0.1 + 1e-6 : 1;
  const x0 = Math.min(minX, 1);
  const px = (x) => left + ((x - x0) / Math.max(maxX - x0, 1e-9)) * (width - left - right);
  const py = (y) => top + (1 - (y - yMin) / Math.max(yMax - yMin, 1e-9)) * (height - top - bottom);
  // enough decimals that the five ticks differ
  const digits = Math.min(6, Math.max(0, Math.ceil(-Math.log10(Math.max((yMax - yMin) / 4, 1e-9))) + 1));
  for (let i = 0; i <= 4; i += 1) {
    const value = yMin + ((yMax - yMin) * i) / 4;
    const y = py(value);
    chart.append(svg('line', { x1: left, x2: width - right, y1: y, y2: y, class: 'grid' }));
    chart.append(svg('text', { x: left - 4, y: y + 3, 'text-anchor': 'end', text: value.toFixed(digits) }));
  }
  chart.append(svg('line', { x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, class: 'axis' }));
  chart.append(svg('text', { x: left, y: height - 8, 'text-anchor': 'start', text: `step ${x0}` }));
  chart.append(svg('text', { x: width - right, y: height - 8, 'text-anchor': 'end', text: `${maxX}` }));
  for (const s of series) {
    const points = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    const coords = points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`);
    if (coords.length > 1) chart.append(svg('polyline', { class: s.class, points: coords.join(' '), 'data-series': s.name }));
    if (coords.length <= 60) {
      points.forEach(([x, y]) => {
        const dot = svg('circle', { class: s.class, cx: px(x).toFixed(1), cy: py(y).toFixed(1), r: 2.5 });
        dot.append(svg('title', { text: `${s.name} · step ${x}: ${y.toFixed(4)}` }));
        chart.append(dot);
      });
    }
  }
  return chart;
}
