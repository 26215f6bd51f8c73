// Evaluations: start a job (models x datasets), watch each cell, the paper-style table and a
// chart, the per-example rows; downloads; cancel.

import * as api from './api.js';
import { groupedBars } from './charts.js';
import { $, clear, download, el, setStatus } from './dom.js';
import { on, state } from './state.js';

const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
const MAX_ROWS_SHOWN = 500;
const POLL_MS = 1000;

let selected = null; // the job shown in detail
let rows = [];
let rowsText = '';
let timer = null;
let polls = 0;
const checkedModels = new Set(['base']);
const checkedDatasets = new Set();

// ------------------------------------------------------------------ the form

function checkboxes(box, names, checked, label = (name) => name) {
  clear(box);
  for (const name of names) {
    const input = el('input', { type: 'checkbox', value: name, checked: checked.has(name) });
    input.addEventListener('change', () => (input.checked ? checked.add(name) : checked.delete(name)));
    box.append(el('label', { class: 'inline' }, input, label(name)));
  }
}

function renderModels() {
  const names = ['base', ...state.adapters.map((a) => a.name)];
  checkboxes($('#eval-models'), names, checkedModels, (name) => (name === 'base' ? `base (${state.base ? state.base.id : ''})` : name));
}

async function loadDatasets() {
  const list = await api.getJSON('/v1/datasets');
  const available = list.data.filter((d) => d.available);
  const box = $('#eval-datasets');
  checkboxes(box, available.map((d) => d.name), checkedDatasets,
    (name) => `${name} (${available.find((d) => d.name === name).num_records ?? '?'})`);
  if (!available.length) box.append(el('span', { class: 'muted', text: 'No dataset files on this server (--data-dir), and none registered.' }));
}

function optionalNumber(id) {
  const value = $(id).value.trim();
  return value === '' ? undefined : Number(value);
}

async function start(event) {
  event.preventDefault();
  const status = $('#eval-form-status');
  const body = {
    models: [...checkedModels].filter((m) => m === 'base' || state.adapters.some((a) => a.name === m)),
    datasets: [...checkedDatasets],
    limit: optionalNumber('#eval-limit'),
    protocol: $('#eval-protocol').value,
  };
  if (body.protocol === 'generate') {
    body.decoding = $('#eval-decoding').value;
    body.max_tokens = optionalNumber('#eval-max-tokens');
  }
  try {
    const job = await api.request('POST', '/v1/evaluations', body).then((r) => r.json());
    setStatus(status, `Started ${job.id}.`, 'ok');
    await select(job.id);
  } catch (error) {
    setStatus(status, error.message, 'error');
  }
}

// ------------------------------------------------------------------ the job list

export async function refresh() {
  await loadDatasets();
  await refreshJobs();
}

async function refreshJobs() {
  const list = await api.getJSON('/v1/evaluations');
  const body = clear($('#eval-jobs tbody'));
  for (const job of list.data) {
    const open = el('button', { type: 'button', class: 'link', text: job.id, onclick: () => select(job.id) });
    body.append(el('tr', { class: job.id === selected ? 'selected' : '', 'data-job': job.id },
      el('td', {}, open),
      el('td', { class: `job-status ${job.status}`, text: job.status }),
      el('td', { text: job.models.join(', ') }),
      el('td', { text: job.datasets.join(', ') }),
      el('td', { class: 'num', text: `${job.progress.done} / ${job.progress.total}` })));
  }
}

// ------------------------------------------------------------------ one job

async function select(id) {
  selected = id;
  rows = [];
  rowsText = '';
  polls = 0;
  $('#eval-detail').hidden = false;
  clear($('#eval-rows tbody'));
  await poll();
}

async function poll() {
  clearTimeout(timer);
  if (!selected) return;
  let job;
  try {
    job = await api.getJSON(`/v1/evaluations/${encodeURIComponent(selected)}`);
  } catch (error) {
    setStatus($('#eval-status'), error.message, 'error');
    return;
  }
  renderJob(job);
  const done = TERMINAL.has(job.status);
  if (done || polls % 5 === 0) await loadRows(job);
  polls += 1;
  refreshJobs().catch(() => {});
  if (!done && job.id === selected) timer = setTimeout(poll, POLL_MS);
}

function renderJob(job) {
  $('#eval-title').textContent = `${job.id} · ${job.status}`;
  $('#eval-detail').dataset.status = job.status;
  const decoding = job.protocol === 'generate' ? `, decoding ${job.decoding}, max_tokens ${job.max_tokens ?? "the paper's"}` : '';
  $('#eval-meta').textContent = `protocol ${job.protocol}${decoding}, limit ${job.limit ?? 'all'}. ${job.note}`;
  const eta = job.progress.eta_s !== null ? `, about ${Math.ceil(job.progress.eta_s)} s left` : '';
  const text = `${job.progress.done} / ${job.progress.total} examples${eta}${job.error ? ` · ${job.error}` : ''}`;
  setStatus($('#eval-status'), text, job.status === 'failed' ? 'error' : '');
  $('#eval-cancel').disabled = TERMINAL.has(job.status);
  renderTable(job);
  renderChart(job);
  $('#eval-detail').job = job;
}

// Accuracy in percent per (model, dataset) and the unweighted Average over scored datasets,
// as server/evaluation/report.py writes results.csv.
export function accuracyTable(job) {
  const cells = new Map(job.results.map((c) => [`${c.model}\u0000${c.dataset}`, c]));
  const header = ['model', ...job.datasets, 'Average'];
  const table = job.models.map((model) => {
    const scores = job.datasets.map((d) => {
      const cell = cells.get(`${model}\u0000${d}`);
      return !cell || cell.accuracy === null ? null : 100 * cell.accuracy;
    });
    const known = scores.filter((s) => s !== null);
    const average = known.length ? known.reduce((a, b) => a + b, 0) / known.length : null;
    return { model, scores, average, cells: job.datasets.map((d) => cells.get(`${model}\u0000${d}`)) };
  });
  return { header, table };
}

const fmt = (value) => (value === null ? '-' : value.toFixed(1));

function renderTable(job) {
  const { header, table } = accuracyTable(job);
  const head = clear($('#eval-table thead'));
  head.append(el('tr', {}, header.map((name) => el('th', { text: name }))));
  const body = clear($('#eval-table tbody'));
  const running = !TERMINAL.has(job.status);
  for (const row of table) {
    const cells = row.scores.map((score, i) => {
      const cell = row.cells[i];
      const td = el('td', { class: 'num', text: fmt(score) });
      if (cell && (running || cell.done < cell.total)) {
        td.append(el('progress', { max: cell.total || 1, value: cell.done }),
          el('small', { text: `${cell.done}/${cell.total}` }));
      }
      return td;
    });
    body.append(el('tr', {}, el('th', { text: row.model }), cells, el('td', { class: 'num average', text: fmt(row.average) })));
  }
}

function renderChart(job) {
  const { table } = accuracyTable(job);
  const groups = [...job.datasets, 'Average'].map((label, i) => ({
    label,
    values: table.map((row) => (i < job.datasets.length ? row.scores[i] : row.average)),
  }));
  const legend = el('p', { class: 'legend' }, table.map((row, s) => el('span', { class: `key series-${s % 8}`, text: row.model })));
  clear($('#eval-chart')).append(groupedBars(groups, job.models), legend);
}

async function loadRows(job) {
  try {
    rowsText = await api.getText(`/v1/evaluations/${encodeURIComponent(job.id)}/results`);
  } catch (error) {
    setStatus($('#eval-status'), error.message, 'error');
    return;
  }
  rows = rowsText.split('\n').filter(Boolean).map((line) => JSON.parse(line));
  fillFilter($('#rows-model'), job.models);
  fillFilter($('#rows-dataset'), job.datasets);
  renderRows();
}

function fillFilter(select, names) {
  const current = select.value;
  clear(select).append(el('option', { value: '', text: 'all' }), ...names.map((name) => el('option', { value: name, text: name })));
  select.value = names.includes(current) ? current : '';
}

function renderRows() {
  const model = $('#rows-model').value;
  const dataset = $('#rows-dataset').value;
  const wrongOnly = $('#rows-wrong').checked;
  const shown = rows.filter((r) => (!model || r.model === model) && (!dataset || r.dataset === dataset) && (!wrongOnly || !r.correct));
  const body = clear($('#eval-rows tbody'));
  for (const row of shown.slice(0, MAX_ROWS_SHOWN)) {
    body.append(el('tr', { class: row.correct ? 'correct' : 'wrong' },
      el('td', { text: row.model }),
      el('td', { text: row.dataset }),
      el('td', { class: 'num', text: row.index }),
      el('td', {}, el('div', { class: 'cell-text', text: row.instruction })),
      el('td', {}, el('div', { class: 'cell-text response', text: row.response })),
      el('td', { class: 'extracted', text: row.extracted ?? '-' }),
      el('td', { text: row.gold }),
      el('td', { class: 'verdict', text: row.correct ? 'yes' : 'no' })));
  }
  $('#rows-count').textContent = shown.length > MAX_ROWS_SHOWN
    ? `${MAX_ROWS_SHOWN} of ${shown.length} rows shown (download all as JSONL)`
    : `${shown.length} rows`;
}

// ------------------------------------------------------------------ downloads and cancel

function csvField(value) {
  const text = String(value);
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function tableCsv(job) {
  const { header, table } = accuracyTable(job);
  const lines = [header, ...table.map((row) => [row.model, ...row.scores.map(fmt), fmt(row.average)])];
  return `${lines.map((line) => line.map(csvField).join(',')).join('\r\n')}\r\n`;
}

function tableJson(job) {
  const { header, table } = accuracyTable(job);
  const rowsOut = table.map((row) => Object.fromEntries(header.map((name, i) => [name, [row.model, ...row.scores.map(fmt), fmt(row.average)][i]])));
  return JSON.stringify({ job, table: rowsOut }, null, 2);
}

async function cancel() {
  const job = $('#eval-detail').job;
  if (!job || !window.confirm(`Cancel the evaluation job ${job.id}? Rows scored so far are kept.`)) return;
  try {
    renderJob(await api.request('DELETE', `/v1/evaluations/${encodeURIComponent(job.id)}`).then((r) => r.json()));
  } catch (error) {
    setStatus($('#eval-status'), error.message, 'error');
  }
  await poll();
}

export function init() {
  $('#eval-form').addEventListener('submit', start);
  $('#eval-protocol').addEventListener('change', () => {
    const generate = $('#eval-protocol').value === 'generate'; // loglikelihood generates nothing
    $('#eval-decoding').disabled = !generate;
    $('#eval-max-tokens').disabled = !generate;
  });
  $('#eval-refresh').addEventListener('click', () => refresh().catch((error) => setStatus($('#eval-form-status'), error.message, 'error')));
  $('#eval-cancel').addEventListener('click', cancel);
  $('#eval-csv').addEventListener('click', () => {
    const job = $('#eval-detail').job;
    if (job) download(`${job.id}.csv`, tableCsv(job), 'text/csv');
  });
  $('#eval-json').addEventListener('click', () => {
    const job = $('#eval-detail').job;
    if (job) download(`${job.id}.json`, tableJson(job), 'application/json');
  });
  $('#eval-rows-jsonl').addEventListener('click', () => {
    const job = $('#eval-detail').job;
    if (job) download(`${job.id}.jsonl`, rowsText, 'application/x-ndjson');
  });
  for (const id of ['#rows-model', '#rows-dataset', '#rows-wrong']) $(id).addEventListener('change', renderRows);
  on('models-changed', renderModels);
}
