// Fine-tuning: upload a training file (or pick one), start a job (the adapter's kind and
// settings, the recipe, evaluation datasets), the jobs list, and for the chosen job a live loss
// curve from its metrics events, the latest step, cancel, and when it succeeds the evaluation
// (base vs the new adapter) and a link that opens the playground with the new model.

import * as adapters from './adapters.js';
import * as api from './api.js';
import { lossCurve } from './charts.js';
import { $, clear, el, formatBytes, formatNumber, setStatus } from './dom.js';
import { accuracyTable } from './evaluations.js';
import { state } from './state.js';

const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
const POLL_MS = 2000;
const EVENTS_LIMIT = 10000; // the newest events the curve is drawn from
const TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];
// The LLM-Adapters paper's targets per kind (server/finetune/adapters.py's defaults).
const DEFAULT_TARGETS = {
  lora: ['q_proj', 'k_proj', 'v_proj', 'up_proj', 'down_proj'],
  dora: ['q_proj', 'k_proj', 'v_proj', 'up_proj', 'down_proj'],
  series: ['gate_proj', 'up_proj', 'down_proj'],
  parallel: ['q_proj', 'k_proj', 'v_proj'],
  ia3: ['k_proj', 'v_proj', 'down_proj'],
};
// The form field a refusal's `param` names, by the param's last part ('adapter.r' -> r).
const PARAM_FIELDS = {
  training_file: '#ft-file-select',
  r: '#ft-r',
  alpha: '#ft-alpha',
  dropout: '#ft-dropout',
  bottleneck_size: '#ft-bottleneck',
  non_linearity: '#ft-nonlinearity',
  scaling: '#ft-scaling',
  num_virtual_tokens: '#ft-virtual-tokens',
  target_modules: '#ft-targets',
  feedforward_modules: '#ft-targets',
  n_epochs: '#ft-epochs',
  batch_size: '#ft-batch-size',
  learning_rate_multiplier: '#ft-lr',
  suffix: '#ft-suffix',
  seed: '#ft-seed',
  max_records: '#ft-max-records',
  max_steps: '#ft-max-steps',
  micro_batch_size: '#ft-micro-batch',
  cutoff_len: '#ft-cutoff',
  checkpoint_every: '#ft-checkpoint-every',
  warmup_steps: '#ft-warmup',
  datasets: '#ft-datasets',
  limit: '#ft-eval-limit',
};

let selected = null; // the job shown in detail
let timer = null;
let settledPolls = 0; // polls since the job ended (its evaluation job may start just after)
const refreshedFor = new Set(); // succeeded jobs whose adapter the model lists already show
const checkedDatasets = new Set();
const checkedTargets = new Set(DEFAULT_TARGETS.lora);

// ------------------------------------------------------------------ training files

function chosenUpload() {
  const input = $('#ft-file-input');
  return input.files && input.files.length ? input.files[0] : null;
}

async function uploadFile(event) {
  event.preventDefault();
  const status = $('#ft-file-status');
  const file = chosenUpload();
  if (!file) {
    setStatus(status, 'Choose a training file first.', 'error');
    return;
  }
  const form = new FormData();
  form.append('purpose', 'fine-tune');
  form.append('file', file, file.name);
  const progress = $('#ft-file-progress');
  progress.hidden = false;
  progress.value = 0;
  $('#ft-file-upload').disabled = true;
  setStatus(status, `Uploading ${file.name}…`, 'busy');
  try {
    const stored = await api.upload('/v1/files', form, (fraction) => (progress.value = fraction));
    setStatus(status, `Uploaded ${stored.filename}: ${stored.records} records (${stored.format}), ${stored.id}.`, 'ok');
    await loadFiles(stored.id);
  } catch (error) {
    setStatus(status, `${file.name}: ${error.message}`, 'error');
  } finally {
    progress.hidden = true;
    $('#ft-file-upload').disabled = false;
  }
}

async function loadFiles(select = null) {
  const list = await api.getJSON('/v1/files?purpose=fine-tune');
  const box = $('#ft-file-select');
  const current = select || box.value;
  clear(box);
  if (!list.data.length) box.append(el('option', { value: '', text: 'no training files yet: upload one above' }));
  for (const file of list.data) {
    box.append(el('option', {
      value: file.id,
      text: `${file.filename} · ${file.records} records · ${formatBytes(file.bytes)} · ${file.id}`,
    }));
  }
  if (list.data.some((f) => f.id === current)) box.value = current;
}

// ------------------------------------------------------------------ the form

function renderTargets() {
  const box = clear($('#ft-targets'));
  for (const name of TARGETS) {
    const input = el('input', { type: 'checkbox', value: name, checked: checkedTargets.has(name) });
    input.addEventListener('change', () => (input.checked ? checkedTargets.add(name) : checkedTargets.delete(name)));
    box.append(el('label', { class: 'inline' }, input, name));
  }
}

function kindChanged() {
  const kind = $('#ft-kind').value;
  for (const node of document.querySelectorAll('#ft-form [data-kinds]')) {
    node.hidden = !node.dataset.kinds.split(' ').includes(kind);
  }
  checkedTargets.clear();
  for (const name of DEFAULT_TARGETS[kind] || []) checkedTargets.add(name);
  renderTargets();
}

async function loadDatasets() {
  const list = await api.getJSON('/v1/datasets');
  const available = list.data.filter((d) => d.available);
  const box = clear($('#ft-datasets'));
  for (const dataset of available) {
    const input = el('input', { type: 'checkbox', value: dataset.name, checked: checkedDatasets.has(dataset.name) });
    input.addEventListener('change', () => (input.checked ? checkedDatasets.add(dataset.name) : checkedDatasets.delete(dataset.name)));
    box.append(el('label', { class: 'inline' }, input, `${dataset.name} (${dataset.num_records ?? '?'})`));
  }
  if (!available.length) box.append(el('span', { class: 'muted', text: 'No datasets on this server (--data-dir), and none registered.' }));
}

function optionalNumber(id) {
  const value = $(id).value.trim();
  return value === '' ? undefined : Number(value);
}

function adapterOptions(kind) {
  const adapter = { kind };
  if (kind === 'lora' || kind === 'dora') {
    Object.assign(adapter, { r: optionalNumber('#ft-r'), alpha: optionalNumber('#ft-alpha'), dropout: optionalNumber('#ft-dropout') });
  } else if (kind === 'series' || kind === 'parallel') {
    const scaling = $('#ft-scaling').value.trim();
    Object.assign(adapter, {
      bottleneck_size: optionalNumber('#ft-bottleneck'),
      non_linearity: $('#ft-nonlinearity').value,
      // a number, or 'learned'; anything else goes as typed, for the server to refuse
      scaling: scaling === '' ? undefined : (Number.isNaN(Number(scaling)) ? scaling : Number(scaling)),
    });
  } else if (kind === 'prefix' || kind === 'prompt') {
    adapter.num_virtual_tokens = optionalNumber('#ft-virtual-tokens');
  }
  if (DEFAULT_TARGETS[kind]) adapter.target_modules = TARGETS.filter((t) => checkedTargets.has(t));
  return adapter;
}

// The POST /v1/fine_tuning/jobs body the form describes (blank fields: the server's defaults).
export function jobBody() {
  const kind = $('#ft-kind').value;
  const auto = (id) => optionalNumber(id) ?? 'auto';
  const body = {
    model: state.base ? state.base.id : '',
    training_file: $('#ft-file-select').value,
    suffix: $('#ft-suffix').value.trim() || undefined,
    seed: optionalNumber('#ft-seed'),
    method: {
      type: 'supervised',
      supervised: {
        hyperparameters: {
          n_epochs: auto('#ft-epochs'),
          batch_size: auto('#ft-batch-size'),
          learning_rate_multiplier: auto('#ft-lr'),
        },
      },
    },
    adapter: adapterOptions(kind),
    training: {
      max_records: optionalNumber('#ft-max-records'),
      max_steps: optionalNumber('#ft-max-steps'),
      micro_batch_size: optionalNumber('#ft-micro-batch'),
      cutoff_len: optionalNumber('#ft-cutoff'),
      checkpoint_every: optionalNumber('#ft-checkpoint-every'),
      warmup_steps: optionalNumber('#ft-warmup'),
      train_on_inputs: $('#ft-train-on-inputs').checked,
    },
  };
  if (checkedDatasets.size) {
    body.evaluations = { datasets: [...checkedDatasets], limit: optionalNumber('#ft-eval-limit') };
  }
  return body;
}

function clearInvalid() {
  for (const node of document.querySelectorAll('#ft-form [aria-invalid]')) node.removeAttribute('aria-invalid');
}

function markInvalid(param) {
  if (!param) return;
  const part = param.split('.').reverse().find((name) => PARAM_FIELDS[name]);
  const field = part && $(PARAM_FIELDS[part]);
  if (field) field.setAttribute('aria-invalid', 'true');
}

async function start(event) {
  event.preventDefault();
  const status = $('#ft-form-status');
  clearInvalid();
  if (!$('#ft-file-select').value) {
    setStatus(status, 'Upload or choose a training file first.', 'error');
    markInvalid('training_file');
    return;
  }
  $('#ft-start').disabled = true;
  try {
    const job = await api.request('POST', '/v1/fine_tuning/jobs', jobBody()).then((r) => r.json());
    setStatus(status, `Started ${job.id}.`, 'ok');
    await select(job.id);
  } catch (error) {
    const where = error.param && !error.message.includes(error.param) ? ` (${error.param})` : '';
    setStatus(status, `${error.message}${where}`, 'error');
    markInvalid(error.param);
  } finally {
    $('#ft-start').disabled = false;
  }
}

// ------------------------------------------------------------------ the job list

export async function refresh() {
  await Promise.all([loadFiles(), loadDatasets()]);
  await refreshJobs();
}

function progressText(job) {
  const { step, total_steps: total } = job.progress || {};
  return total ? `${step} / ${total}` : '-';
}

async function refreshJobs() {
  const list = await api.getJSON('/v1/fine_tuning/jobs?limit=100');
  const body = clear($('#ft-jobs tbody'));
  $('#ft-jobs-empty').hidden = list.data.length > 0;
  for (const job of list.data) {
    const open = el('button', { type: 'button', class: 'link', text: job.id, onclick: () => select(job.id) });
    const { step, total_steps: total } = job.progress || {};
    body.append(el('tr', { class: job.id === selected ? 'selected' : '', 'data-job': job.id },
      el('td', {}, open),
      el('td', { class: `job-status ${job.status}`, text: job.status }),
      el('td', { text: job.adapter ? job.adapter.kind : '-' }),
      el('td', { class: 'name', text: job.fine_tuned_model || job.model }),
      el('td', { class: 'num' }, progressText(job), total ? el('progress', { max: total, value: step }) : null)));
  }
}

// ------------------------------------------------------------------ one job

async function select(id) {
  selected = id;
  settledPolls = 0;
  $('#ft-detail').hidden = false;
  clear($('#ft-chart'));
  clear($('#ft-latest'));
  $('#ft-eval').hidden = true;
  await poll();
}

async function poll() {
  clearTimeout(timer);
  const id = selected;
  if (!id) return;
  const path = `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`;
  let job;
  let events;
  try {
    [job, events] = await Promise.all([api.getJSON(path), api.getJSON(`${path}/events?limit=${EVENTS_LIMIT}`)]);
  } catch (error) {
    if (id !== selected) return;
    setStatus($('#ft-status'), error.message, 'error');
    if (error.status !== 404 && error.status !== 401) timer = setTimeout(poll, POLL_MS);
    return;
  }
  if (id !== selected) return; // another job was chosen meanwhile
  renderJob(job, events.data);
  let evaluating = false;
  if (job.evaluation_job_id) evaluating = await loadEvaluation(job);
  if (TERMINAL.has(job.status)) settledPolls += 1;
  await loadCheckpoints(job).catch(() => {});
  if (job.status === 'succeeded' && !refreshedFor.has(job.id)) {
    refreshedFor.add(job.id); // the new adapter joins the playground's and evaluations' lists
    adapters.refresh().catch(() => {});
  }
  refreshJobs().catch(() => {});
  const awaitingEvaluation = job.status === 'succeeded' && job.evaluations && !job.evaluation_job_id && settledPolls < 3;
  if (id === selected && (!TERMINAL.has(job.status) || evaluating || awaitingEvaluation)) {
    timer = setTimeout(poll, POLL_MS);
  }
}

function adapterSummary(adapter) {
  if (!adapter) return '';
  const parts = [adapter.kind];
  if ('r' in adapter) parts.push(`r ${adapter.r}`, `alpha ${adapter.alpha}`, `dropout ${adapter.dropout}`);
  if ('bottleneck_size' in adapter) parts.push(`size ${adapter.bottleneck_size}`, adapter.non_linearity, `scaling ${adapter.scaling}`);
  if ('num_virtual_tokens' in adapter) parts.push(`${adapter.num_virtual_tokens} virtual tokens`);
  if (adapter.target_modules) parts.push(`on ${adapter.target_modules.join(', ')}`);
  return parts.join(' · ');
}

function renderJob(job, events) {
  $('#ft-title').textContent = `${job.id} · ${job.status}`;
  $('#ft-detail').dataset.status = job.status;
  $('#ft-detail').dataset.job = job.id;
  const hyper = job.hyperparameters || {};
  const train = job.training || {};
  const limits = [train.max_records ? `first ${train.max_records} records` : null, train.max_steps ? `at most ${train.max_steps} steps` : null].filter(Boolean);
  $('#ft-meta').textContent = [
    `base ${job.model}`,
    adapterSummary(job.adapter),
    `${hyper.n_epochs} epochs, batch ${hyper.batch_size}, lr ×${hyper.learning_rate_multiplier}`,
    ...limits,
    `file ${job.training_file}`,
    job.fine_tuned_model ? `model ${job.fine_tuned_model}` : null,
  ].filter(Boolean).join(' · ');
  const messages = events.filter((e) => e.type !== 'metrics');
  let text = `${job.status}: step ${progressText(job)}`;
  if (job.estimated_finish) text += `, about ${Math.max(0, job.estimated_finish - Math.floor(Date.now() / 1000))} s left`;
  if (job.error) text += ` · ${job.error.message || JSON.stringify(job.error)}`;
  else if (messages.length) text += ` · ${messages[0].message}`;
  setStatus($('#ft-status'), text, job.status === 'failed' ? 'error' : (TERMINAL.has(job.status) ? 'ok' : 'busy'));
  $('#ft-cancel').hidden = TERMINAL.has(job.status);
  $('#ft-cancel').disabled = TERMINAL.has(job.status);
  const ready = job.status === 'succeeded' && Boolean(job.fine_tuned_model);
  $('#ft-try').hidden = !ready;
  $('#ft-detail').job = job;
  renderCurve(job, events.filter((e) => e.type === 'metrics').map((e) => e.data).reverse());
}

function renderCurve(job, metrics) {
  const train = metrics.filter((m) => m.train_loss !== null && m.train_loss !== undefined).map((m) => [m.step, m.train_loss]);
  const valid = metrics.filter((m) => m.valid_loss !== null && m.valid_loss !== undefined).map((m) => [m.step, m.valid_loss]);
  const box = clear($('#ft-chart'));
  box.dataset.points = String(train.length);
  if (!train.length) {
    box.append(el('p', { class: 'muted', text: TERMINAL.has(job.status) ? 'No training steps were logged.' : 'Waiting for the first step…' }));
  } else {
    const series = [{ name: 'train loss', class: 'train', points: train }];
    if (valid.length) series.push({ name: 'validation loss', class: 'valid', points: valid });
    box.append(lossCurve(series, { totalSteps: job.progress && job.progress.total_steps }),
      el('p', { class: 'legend' }, series.map((s, i) => el('span', { class: `key series-${i}`, text: s.name }))));
  }
  const latest = metrics[metrics.length - 1];
  const card = clear($('#ft-latest'));
  const item = (name, value) => card.append(el('dt', { text: name }), el('dd', { 'data-field': name, text: value }));
  const total = latest && latest.total_steps ? latest.total_steps : (job.progress || {}).total_steps;
  item('step', latest ? `${latest.step} / ${total ?? '?'}` : '-');
  item('train loss', latest ? formatNumber(latest.train_loss, 4) : '-');
  item('validation loss', latest && latest.valid_loss !== null && latest.valid_loss !== undefined ? formatNumber(latest.valid_loss, 4) : '-');
  item('learning rate', latest && latest.learning_rate !== undefined && latest.learning_rate !== null ? Number(latest.learning_rate).toExponential(2) : '-');
  item('tokens/s', latest ? formatNumber(latest.tokens_per_second, 1) : '-');
  item('trained tokens', job.trained_tokens !== null && job.trained_tokens !== undefined ? formatNumber(job.trained_tokens) : '-');
}

async function loadCheckpoints(job) {
  const list = await api.getJSON(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/checkpoints?limit=100`);
  const steps = list.data.map((c) => c.step_number).sort((a, b) => a - b);
  $('#ft-checkpoints').textContent = steps.length ? `${steps.length} at steps ${steps.join(', ')}` : 'none yet';
}

// The evaluation job started when the fine-tuning job succeeded; true while it still runs.
async function loadEvaluation(job) {
  const section = $('#ft-eval');
  section.hidden = false;
  let evaluation;
  try {
    evaluation = await api.getJSON(`/v1/evaluations/${encodeURIComponent(job.evaluation_job_id)}`);
  } catch (error) {
    setStatus($('#ft-eval-status'), error.message, 'error');
    return false;
  }
  section.dataset.status = evaluation.status;
  const { header, table } = accuracyTable(evaluation);
  const running = !TERMINAL.has(evaluation.status);
  const fmt = (value) => (value === null ? '-' : value.toFixed(1));
  clear($('#ft-eval-table thead')).append(el('tr', {}, header.map((name) => el('th', { text: name }))));
  const body = clear($('#ft-eval-table tbody'));
  for (const row of table) {
    const label = row.model === 'base' ? `base (${job.model})` : row.model;
    const cells = row.scores.map((score, i) => {
      const cell = row.cells[i];
      const td = el('td', { class: 'num', text: fmt(score) });
      if (cell && (running || cell.done < cell.total)) {
        td.append(el('progress', { max: cell.total || 1, value: cell.done }), el('small', { text: `${cell.done}/${cell.total}` }));
      }
      return td;
    });
    body.append(el('tr', { 'data-model': row.model }, el('th', { text: label }), cells, el('td', { class: 'num average', text: fmt(row.average) })));
  }
  const { done, total } = evaluation.progress;
  const error = evaluation.error ? ` · ${evaluation.error}` : '';
  setStatus($('#ft-eval-status'), `${evaluation.id} · ${evaluation.status}: ${done} / ${total} examples${error}`,
    evaluation.status === 'failed' ? 'error' : (running ? 'busy' : 'ok'));
  return running;
}

async function cancel() {
  const job = $('#ft-detail').job;
  if (!job || !window.confirm(`Cancel the fine-tuning job ${job.id}? Its checkpoints are kept; no adapter is served.`)) return;
  try {
    await api.request('POST', `/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/cancel`);
  } catch (error) {
    setStatus($('#ft-status'), error.message, 'error');
  }
  await poll();
}

function tryInPlayground() {
  const job = $('#ft-detail').job;
  if (job && job.fine_tuned_model) location.hash = `playground?model=${encodeURIComponent(job.fine_tuned_model)}`;
}

export function init() {
  renderTargets();
  kindChanged();
  $('#ft-kind').addEventListener('change', kindChanged);
  $('#ft-file-input').addEventListener('change', () => {
    const file = chosenUpload();
    $('#ft-file-chosen').textContent = file ? `${file.name} (${formatBytes(file.size)})` : '';
  });
  $('#ft-file-form').addEventListener('submit', uploadFile);
  $('#ft-form').addEventListener('submit', start);
  $('#ft-files-refresh').addEventListener('click', () => loadFiles().catch((error) => setStatus($('#ft-form-status'), error.message, 'error')));
  $('#ft-refresh').addEventListener('click', () => refresh().catch((error) => setStatus($('#ft-form-status'), error.message, 'error')));
  $('#ft-cancel').addEventListener('click', cancel);
  $('#ft-try').addEventListener('click', tryInPlayground);
}
