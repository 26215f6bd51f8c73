// Tabs, the API key (asked for on a 401, kept in sessionStorage for this tab), start-up.

import * as api from './api.js';
import { $ } from './dom.js';
import * as adapters from './adapters.js';
import * as evaluations from './evaluations.js';
import * as finetune from './finetune.js';
import * as metrics from './metrics.js';
import * as playground from './playground.js';

const TABS = ['adapters', 'playground', 'evaluations', 'finetune', 'metrics'];

function showTab(name) {
  const tab = TABS.includes(name) ? name : TABS[0];
  for (const other of TABS) $(`#tab-${other}`).hidden = other !== tab;
  for (const button of document.querySelectorAll('.tab')) {
    button.classList.toggle('active', button.dataset.tab === tab);
    button.setAttribute('aria-selected', String(button.dataset.tab === tab));
  }
  history.replaceState(null, '', `#${tab}`);
}

// `#tab`, or `#playground?model=NAME`: the playground with that model chosen (the fine-tuning
// screen's "Try in playground" links there).
function route() {
  const [name, query = ''] = location.hash.slice(1).split('?');
  showTab(name);
  const model = new URLSearchParams(query).get('model');
  if (name === 'playground' && model) playground.choose(model, adapters.refresh);
}

function askForKey(reason) {
  metrics.stop();
  $('#key-panel').hidden = false;
  $('#server-status').textContent = 'API key needed';
  $('#key-error').textContent = api.getKey() ? reason : '';
  $('#key-input').focus();
}

async function connect() {
  try {
    await adapters.refresh();
  } catch (error) {
    if (error.status !== 401) $('#server-status').textContent = `no answer: ${error.message}`;
    return;
  }
  $('#key-panel').hidden = true;
  $('#key-error').textContent = '';
  $('#server-status').textContent = `serving ${api.getKey() ? '(key set) ' : ''}`;
  $('#server-status').append(document.createTextNode(adapters.baseId()));
  metrics.start();
  evaluations.refresh().catch(() => {});
  finetune.refresh().catch(() => {});
}

function initKey() {
  api.onUnauthorized(askForKey);
  $('#key-open').addEventListener('click', () => {
    const panel = $('#key-panel');
    panel.hidden = !panel.hidden;
    if (!panel.hidden) $('#key-input').focus();
  });
  $('#key-form').addEventListener('submit', (event) => {
    event.preventDefault();
    api.setKey($('#key-input').value.trim());
    $('#key-input').value = '';
    connect();
  });
  $('#key-forget').addEventListener('click', () => {
    api.setKey('');
    connect();
  });
}

function init() {
  for (const button of document.querySelectorAll('.tab')) {
    button.addEventListener('click', () => showTab(button.dataset.tab));
  }
  route();
  window.addEventListener('hashchange', route);
  initKey();
  adapters.init();
  playground.init();
  evaluations.init();
  finetune.init();
  metrics.init();
  connect();
}

init();
