// Playground: one prompt (or one chat message) to several models at once, streamed side by
// side; time to first token and tokens per second per column.

import * as api from './api.js';
import { $, clear, el, setStatus } from './dom.js';
import { modelNames, on } from './state.js';

const checked = new Set();
let controller = null;
let wanted = null; // a model to choose once the lists know it (a new fine-tuned adapter)

function renderModels() {
  const box = clear($('#play-models'));
  const names = modelNames();
  if (wanted && names.includes(wanted)) {
    checked.clear();
    checked.add(wanted);
    setStatus($('#play-status'), `${wanted} chosen.`, 'ok');
    wanted = null;
  }
  if (!checked.size && names.length) checked.add(names[0]);
  for (const name of [...checked]) if (!names.includes(name)) checked.delete(name);
  names.forEach((name, i) => {
    const input = el('input', { type: 'checkbox', value: name, checked: checked.has(name) });
    input.addEventListener('change', () => (input.checked ? checked.add(name) : checked.delete(name)));
    box.append(el('label', { class: 'inline' }, input, i === 0 ? `${name} (base)` : name));
  });
}

function numberField(id) {
  const value = $(id).value.trim();
  return value === '' ? undefined : Number(value);
}

// The request body for one model, or an Error saying what to fix.
function requestBody(model) {
  const chat = document.querySelector('input[name="play-mode"]:checked').value === 'chat';
  const prompt = $('#play-prompt').value;
  const body = chat ? { messages: [{ role: 'user', content: prompt }] } : { prompt };
  Object.assign(body, {
    model,
    max_tokens: numberField('#play-max-tokens'),
    temperature: numberField('#play-temperature'),
    top_p: numberField('#play-top-p'),
    seed: numberField('#play-seed'),
    stream: true,
    stream_options: { include_usage: true },
  });
  const stop = $('#play-stop').value;
  if (stop) body.stop = [stop];
  const extra = $('#play-extra').value.trim();
  if (extra) {
    let fields;
    try {
      fields = JSON.parse(extra);
    } catch (error) {
      throw new Error(`More request fields: not JSON (${error.message})`);
    }
    if (!fields || typeof fields !== 'object' || Array.isArray(fields)) throw new Error('More request fields: expected a JSON object');
    Object.assign(body, fields);
  }
  for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
  return { path: chat ? '/v1/chat/completions' : '/v1/completions', body, chat };
}

function column(model) {
  const stats = el('p', { class: 'stats muted', text: 'waiting…' });
  const output = el('pre', { class: 'output' });
  const error = el('p', { class: 'error' });
  const node = el('article', { class: 'column panel', 'data-model': model }, el('h3', { text: model }), stats, output, error);
  return { node, stats, output, error };
}

// Decode speed: tokens after the first over the time after the first; shown only when they
// were spread over a measurable time (a stream can arrive in one burst).
function showStats(view, timing) {
  const parts = [];
  if (timing.first !== null) parts.push(`TTFT ${((timing.first - timing.start) / 1000).toFixed(2)} s`);
  if (timing.tokens !== null) {
    const end = timing.end ?? performance.now();
    const decodeSeconds = timing.first === null ? 0 : (end - timing.first) / 1000;
    const speed = timing.tokens > 1 && decodeSeconds >= 0.02 ? ((timing.tokens - 1) / decodeSeconds).toFixed(1) : '-';
    parts.push(`${timing.tokens} tokens`, `${speed} tok/s`);
  }
  if (timing.finish) parts.push(`finish: ${timing.finish}`);
  view.stats.textContent = parts.join(' · ') || 'streaming…';
}

async function run(model, view, signal) {
  const { path, body, chat } = requestBody(model);
  const timing = { start: performance.now(), first: null, end: null, tokens: null, finish: null };
  try {
    const response = await api.request('POST', path, body, signal);
    for await (const data of api.events(response)) {
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      const text = choice ? (chat ? choice.delta && choice.delta.content : choice.text) : '';
      if (text) {
        if (timing.first === null) timing.first = performance.now();
        view.output.append(text); // a text node: model output is never parsed as HTML
      }
      if (choice && choice.finish_reason) timing.finish = choice.finish_reason;
      if (chunk.usage) timing.tokens = chunk.usage.completion_tokens;
      showStats(view, timing);
    }
    timing.end = performance.now();
    showStats(view, timing);
  } catch (error) {
    view.error.textContent = error.name === 'AbortError' ? 'stopped' : error.message;
  } finally {
    view.node.classList.add('done');
  }
}

async function submit(event) {
  event.preventDefault();
  const models = modelNames().filter((name) => checked.has(name));
  const status = $('#play-status');
  if (!models.length) {
    setStatus(status, 'Choose at least one model.', 'error');
    return;
  }
  try {
    requestBody(models[0]);
  } catch (error) {
    setStatus(status, error.message, 'error');
    return;
  }
  if (controller) controller.abort();
  controller = new AbortController();
  const columns = clear($('#play-columns'));
  const views = models.map((model) => column(model));
  columns.append(...views.map((view) => view.node));
  setStatus(status, `streaming from ${models.length} model${models.length > 1 ? 's' : ''}…`, 'busy');
  const start = performance.now();
  await Promise.all(models.map((model, i) => run(model, views[i], controller.signal)));
  setStatus(status, `done in ${((performance.now() - start) / 1000).toFixed(2)} s`, 'ok');
}

// Choose this model alone (`#playground?model=NAME`); `reload` fetches the model lists when
// the name is not in them yet.
export function choose(model, reload) {
  wanted = model;
  if (modelNames().includes(model)) renderModels();
  else {
    reload().then(() => {
      if (wanted === model) setStatus($('#play-status'), `No model ${model} on this server.`, 'error');
    }).catch((error) => setStatus($('#play-status'), error.message, 'error'));
  }
}

export function init() {
  $('#play-form').addEventListener('submit', submit);
  $('#play-stop-button').addEventListener('click', () => controller && controller.abort());
  on('models-changed', renderModels);
}
