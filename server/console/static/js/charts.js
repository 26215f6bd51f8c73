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
