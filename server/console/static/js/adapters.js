// Adapters: the base model card, every adapter's card, upload (drag-and-drop of a folder, its
// files or an archive; progress; the server's message as it is), replace and delete.

import * as api from './api.js';
import { $, clear, el, formatBytes, formatNumber, setStatus } from './dom.js';
import { emit, on, state } from './state.js';

// The files the server reads from an adapter folder (adapters/formats: the allow-list), and
// pickle weights, sent so that the server's refusal of them is what the user reads.
const SENT_FILES = new Set(['adapter_config.json', 'adapter_model.safetensors', 'README.md', 'adapter_model.bin']);
const ARCHIVE = /\.(zip|tar\.gz|tgz)$/i;

let chosen = { files: [], archive: null, leftOut: [] };
let replacing = null; // the adapter whose Replace button was pressed
const servedCells = new Map(); // model -> [requests cell, tokens cell]

export function baseId() {
  return state.base ? state.base.id : '';
}

export async function refresh() {
  const [models, list] = await Promise.all([api.getJSON('/v1/models'), api.getJSON('/v1/adapters')]);
  state.base = models.data.find((card) => !card.parent) || null;
  state.adapters = list.data;
  renderBase();
  renderTable();
  emit('models-changed');
}

function renderBase() {
  const base = state.base;
  const card = clear($('#base-card'));
  if (!base) return;
  const rows = [
    ['id', base.id],
    ['quantization', base.quantization ?? 'none'],
    ['context', formatNumber(base.max_model_len)],
    ['hidden size', base.hidden_size],
    ['layers', base.num_hidden_layers],
    ['heads (q / kv)', `${base.num_attention_heads} / ${base.num_key_value_heads}`],
    ['intermediate size', base.intermediate_size],
    ['vocabulary', formatNumber(base.vocab_size)],
  ];
  for (const [name, value] of rows) card.append(el('dt', { text: name }), el('dd', { text: value ?? '-' }));
  const requests = el('dd', { text: '-' });
  const tokens = el('dd', { text: '-' });
  card.append(el('dt', { text: 'requests' }), requests, el('dt', { text: 'tokens in / out' }), tokens);
  servedCells.set(base.id, [requests, tokens]);
  showServed();
}

function renderTable() {
  const body = clear($('#adapters-table tbody'));
  for (const adapter of state.adapters) {
    const requests = el('td', { class: 'num', text: '-' });
    const tokens = el('td', { class: 'num', text: '-' });
    servedCells.set(adapter.name, [requests, tokens]);
    const rank = adapter.num_virtual_tokens ? `${adapter.num_virtual_tokens} tokens` : adapter.rank;
    body.append(el('tr', { 'data-name': adapter.name },
      el('td', { class: 'name', text: adapter.name }),
      el('td', { text: adapter.kind }),
      el('td', { class: 'num', text: rank }),
      el('td', { class: 'targets', text: adapter.targets.join(', ') || '-' }),
      el('td', { class: 'num', text: formatBytes(adapter.size_bytes) }),
      el('td', { text: adapter.tier }),
      el('td', { class: 'num', text: adapter.version }),
      el('td', { text: adapter.origin }),
      requests, tokens,
      el('td', { class: 'actions' },
        el('button', { type: 'button', class: 'replace', text: 'Replace', onclick: () => startReplace(adapter.name) }),
        el('button', { type: 'button', class: 'delete danger', text: 'Delete', onclick: () => remove(adapter.name) })),
    ));
  }
  $('#adapters-empty').hidden = state.adapters.length > 0;
  showServed();
}

function showServed() {
  for (const [model, [requests, tokens]] of servedCells) {
    const served = state.served[model];
    if (!served) continue;
    requests.textContent = formatNumber(served.requests);
    tokens.textContent = `${formatNumber(served.promptTokens)} / ${formatNumber(served.generatedTokens)}`;
  }
}

// ------------------------------------------------------------------ choosing files

function choose(files) {
  const archives = files.filter((file) => ARCHIVE.test(file.name));
  if (files.length === 1 && archives.length === 1) {
    chosen = { files: [], archive: files[0], leftOut: [] };
  } else {
    chosen = {
      files: files.filter((file) => SENT_FILES.has(file.name)),
      archive: null,
      leftOut: files.filter((file) => !SENT_FILES.has(file.name)).map((file) => file.name),
    };
  }
  const sent = chosen.archive ? [chosen.archive] : chosen.files;
  const text = sent.length ? `to send: ${sent.map((f) => `${f.name} (${formatBytes(f.size)})`).join(', ')}` : 'no adapter files chosen';
  $('#upload-chosen').textContent = chosen.leftOut.length
    ? `${text}; left out (the server reads only adapter_config.json, adapter_model.safetensors, README.md): ${chosen.leftOut.join(', ')}`
    : text;
  return sent.length > 0;
}

function defaultName(files) {
  const first = files[0];
  if (!first) return '';
  if (files.length === 1 && ARCHIVE.test(first.name)) return first.name.replace(ARCHIVE, '');
  const folder = (first.webkitRelativePath || first.folder || '').split('/')[0];
  return folder || '';
}

// The files of a drop: plain files, or the top-level files of dropped folders.
async function droppedFiles(dataTransfer) {
  const entries = [...dataTransfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
  if (!entries.length) return [...dataTransfer.files];
  const files = [];
  for (const entry of entries) {
    if (entry.isFile) files.push(await fileOf(entry));
    else if (entry.isDirectory) {
      for (const child of await readDirectory(entry)) {
        if (child.isFile) {
          const file = await fileOf(child);
          file.folder = entry.name;
          files.push(file);
        }
      }
    }
  }
  return files;
}

function fileOf(entry) {
  return new Promise((resolve, reject) => entry.file(resolve, reject));
}

async function readDirectory(entry) {
  const reader = entry.createReader();
  const all = [];
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) return all;
    all.push(...batch);
  }
}

function takeFiles(files) {
  if (choose(files) && !$('#upload-name').value) $('#upload-name').value = defaultName(files);
}

// ------------------------------------------------------------------ upload, replace, delete

async function send(name, replace) {
  const form = new FormData();
  form.append('name', name);
  if (chosen.archive) form.append('archive', chosen.archive, chosen.archive.name);
  for (const file of chosen.files) form.append('files', file, file.name);
  const progress = $('#upload-progress');
  progress.hidden = false;
  progress.value = 0;
  const status = replacing ? $('#adapters-status') : $('#upload-status');
  setStatus(status, `uploading ${name}…`, 'busy');
  try {
    const card = await api.upload(`/v1/adapters${replace ? '?replace=true' : ''}`, form, (done) => { progress.value = done; });
    progress.value = 1;
    const ignored = card.ignored_files && card.ignored_files.length ? `; the server ignored ${card.ignored_files.join(', ')}` : '';
    setStatus(status, `${replace ? 'Replaced' : 'Uploaded'} ${card.name}: ${card.kind}, rank ${card.rank}, version ${card.version}${ignored}`, 'ok');
    await refresh();
  } catch (error) {
    setStatus(status, error.message, 'error');
  } finally {
    progress.hidden = true;
  }
}

async function submitUpload(event) {
  event.preventDefault();
  const name = $('#upload-name').value.trim();
  const replace = $('#upload-replace').checked;
  if (!chosen.archive && !chosen.files.length) {
    setStatus($('#upload-status'), 'Choose or drop the adapter files (or one archive) first.', 'error');
    return;
  }
  if (replace && state.adapters.some((a) => a.name === name)
      && !window.confirm(`Replace the adapter ${name}? Requests already accepted finish on its current version.`)) return;
  replacing = null;
  await send(name, replace);
}

function startReplace(name) {
  replacing = name;
  $('#replace-files').value = '';
  $('#replace-files').click();
}

async function replaceChosen(files) {
  const name = replacing;
  if (!name || !choose(files)) return;
  if (!window.confirm(`Replace the adapter ${name} with ${files.map((f) => f.name).join(', ')}? Requests already accepted finish on its current version.`)) {
    replacing = null;
    return;
  }
  await send(name, true);
  replacing = null;
}

async function remove(name) {
  if (!window.confirm(`Delete the adapter ${name}? Requests already accepted finish on it; new ones get 404.`)) return;
  const status = $('#adapters-status');
  try {
    await api.request('DELETE', `/v1/adapters/${encodeURIComponent(name)}`);
    setStatus(status, `Deleted ${name}.`, 'ok');
    await refresh();
  } catch (error) {
    setStatus(status, error.message, 'error');
  }
}

export function init() {
  // A file dropped beside the zone must not make the browser leave the page to open it.
  for (const type of ['dragover', 'drop']) window.addEventListener(type, (event) => event.preventDefault());
  const zone = $('#drop-zone');
  for (const type of ['dragenter', 'dragover']) {
    zone.addEventListener(type, (event) => { event.preventDefault(); zone.classList.add('over'); });
  }
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', async (event) => {
    event.preventDefault();
    zone.classList.remove('over');
    takeFiles(await droppedFiles(event.dataTransfer));
  });
  $('#upload-files').addEventListener('change', (event) => takeFiles([...event.target.files]));
  $('#upload-folder').addEventListener('change', (event) => takeFiles([...event.target.files]));
  $('#replace-files').addEventListener('change', (event) => replaceChosen([...event.target.files]));
  $('#upload-form').addEventListener('submit', submitUpload);
  $('#adapters-refresh').addEventListener('click', () => refresh().catch((error) => setStatus($('#adapters-status'), error.message, 'error')));
  on('metrics', showServed);
}
