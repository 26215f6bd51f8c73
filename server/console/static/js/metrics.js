// Live metrics from /metrics (Prometheus text, parsed here): throughput, running and waiting
// requests, KV blocks, distinct adapters per step, adapter tiers; and the per-model counters
// that the adapters table shows.

import * as api from './api.js';
import { sparkline } from './charts.js';
import { $, clear, el, formatNumber } from './dom.js';
import { byLabel, parse, total } from './prom.js';
import { emit, state } from './state.js';

const POLL_MS = 2000;
const HISTORY = 60;

// Each tile: what it shows, from the samples now and at the previous poll (dt seconds apart).
const TILES = [
  // live: every engine step observes the tokens it ran (prompt chunks + one per decode)
  { id: 'step-tps', title: 'tokens / s (engine steps)', digits: 1, value: (now, prev, dt) => rate(now, prev, dt, 'adapterserve_step_tokens_sum') },
  { id: 'steps', title: 'engine steps / s', digits: 1, value: (now, prev, dt) => rate(now, prev, dt, 'adapterserve_step_tokens_count') },
  // counted when a request finishes
  { id: 'gen-tps', title: 'generated tokens / s (finished requests)', digits: 1, value: (now, prev, dt) => rate(now, prev, dt, 'adapterserve_generation_tokens_total') },
  { id: 'req-rate', title: 'requests finished / s', digits: 2, value: (now, prev, dt) => rate(now, prev, dt, 'adapterserve_requests_total') },
  { id: 'running', title: 'requests running', value: (now) => total(now, 'adapterserve_requests_running') },
  { id: 'waiting', title: 'requests waiting', value: (now) => total(now, 'adapterserve_requests_waiting') },
  {
    id: 'kv', title: 'KV blocks used', value: (now) => total(now, 'adapterserve_kv_blocks_used'),
    suffix: (now) => ` / ${formatNumber(total(now, 'adapterserve_kv_blocks_total'))}`,
    max: (now) => total(now, 'adapterserve_kv_blocks_total'),
  },
  {
    id: 'step-adapters', title: 'distinct adapters per step', digits: 2,
    value: (now, prev) => perStep(now, prev, 'adapterserve_step_distinct_adapters'),
  },
  {
    id: 'step-tokens', title: 'tokens per step', digits: 1,
    value: (now, prev) => perStep(now, prev, 'adapterserve_step_tokens'),
  },
  { id: 'hit-rate', title: 'prefix cache hit rate', digits: 2, value: (now) => total(now, 'adapterserve_prefix_cache_hit_rate'), max: () => 1 },
];

let previous = null;
let previousAt = 0;
let timer = null;
let run = 0; // start() begins a new run; a poll of an older run schedules nothing
const history = Object.fromEntries(TILES.map((tile) => [tile.id, []]));
const views = {};

function rate(now, prev, dt, name) {
  if (!prev || dt <= 0) return 0;
  return Math.max(0, total(now, name) - total(prev, name)) / dt;
}

// The mean of a histogram's observations since the previous poll (0 when no step ran).
function perStep(now, prev, name) {
  if (!prev) return 0;
  const steps = total(now, `${name}_count`) - total(prev, `${name}_count`);
  return steps > 0 ? (total(now, `${name}_sum`) - total(prev, `${name}_sum`)) / steps : 0;
}

function buildTiles() {
  const box = clear($('#metric-tiles'));
  for (const tile of TILES) {
    const value = el('span', { class: 'value', text: '-' });
    const chart = el('div', { class: 'spark-box' });
    box.append(el('div', { class: 'tile panel', 'data-metric': tile.id }, el('h3', { text: tile.title }), value, chart));
    views[tile.id] = { value, chart };
  }
}

function render(now, dt) {
  for (const tile of TILES) {
    const value = tile.value(now, previous, dt);
    const series = history[tile.id];
    series.push(value);
    if (series.length > HISTORY) series.shift();
    views[tile.id].value.textContent = formatNumber(value, tile.digits || 0) + (tile.suffix ? tile.suffix(now) : '');
    views[tile.id].chart.replaceChildren(sparkline(series, { max: tile.max ? tile.max(now) : undefined }));
  }
  const tiers = clear($('#metric-tiers'));
  for (const [tier, count] of Object.entries(byLabel(now, 'adapterserve_adapters', 'tier'))) {
    tiers.append(el('dt', { text: tier }), el('dd', { text: formatNumber(count) }));
  }
}

function servedByModel(now) {
  const served = {};
  const add = (name, field) => {
    for (const [model, value] of Object.entries(byLabel(now, name, 'model'))) {
      served[model] = served[model] || { requests: 0, promptTokens: 0, generatedTokens: 0 };
      served[model][field] += value;
    }
  };
  add('adapterserve_requests_total', 'requests');
  add('adapterserve_prompt_tokens_total', 'promptTokens');
  add('adapterserve_generation_tokens_total', 'generatedTokens');
  return served;
}

async function poll(current) {
  let now;
  try {
    now = parse(await api.getText('/metrics'));
  } catch (error) {
    // 401: the key panel is open, and start() runs again once a key is given
    if (error.status !== 401 && current === run) timer = setTimeout(() => poll(current), POLL_MS);
    return;
  }
  if (current !== run) return;
  const at = performance.now();
  render(now, (at - previousAt) / 1000);
  previous = now;
  previousAt = at;
  state.served = servedByModel(now);
  emit('metrics');
  timer = setTimeout(() => poll(current), POLL_MS);
}

export function start() {
  stop();
  poll(run);
}

export function stop() {
  clearTimeout(timer);
  timer = null;
  run += 1;
}

export function init() {
  buildTiles();
}
