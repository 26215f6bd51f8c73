// The HTTP API, with the key from sessionStorage (this tab only) as a bearer token.

const KEY_STORAGE = 'adapterserve.apiKey';

let unauthorized = () => {};

export function onUnauthorized(handler) {
  unauthorized = handler;
}

export function getKey() {
  return sessionStorage.getItem(KEY_STORAGE) || '';
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

export class ApiError extends Error {
  constructor(status, message, param = null, code = null) {
    super(message);
    this.status = status;
    this.param = param; // the request field the server named (OpenAI's error.param), if any
    this.code = code;
  }
}

export function authHeaders(extra = {}) {
  const key = getKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

// The server's own message (OpenAI's error shape), else the body as it came, else the status.
export function errorMessage(status, text) {
  try {
    const body = JSON.parse(text);
    if (body && body.error && typeof body.error.message === 'string') return body.error.message;
  } catch {
    // not JSON: shown as it is
  }
  return text || `HTTP ${status}`;
}

// A 403 whose code is admin_key_required: a valid key without the admin role (an upload, a
// delete): the key panel asks for another key, as for a 401.
function needsAnotherKey(status, text) {
  if (status === 401) return true;
  if (status !== 403) return false;
  try {
    const body = JSON.parse(text);
    return Boolean(body && body.error && body.error.code === 'admin_key_required');
  } catch {
    return false;
  }
}

// error.param and error.code of OpenAI's error shape, where the body has them.
function errorFields(text) {
  try {
    const body = JSON.parse(text);
    const error = body && body.error;
    if (error && typeof error === 'object') {
      return [typeof error.param === 'string' ? error.param : null, typeof error.code === 'string' ? error.code : null];
    }
  } catch {
    // not JSON
  }
  return [null, null];
}

function failure(status, text) {
  const error = new ApiError(status, errorMessage(status, text), ...errorFields(text));
  if (needsAnotherKey(status, text)) unauthorized(error.message);
  return error;
}

export async function request(method, path, body, signal) {
  const init = { method, headers: authHeaders(), signal };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw failure(response.status, await response.text());
  return response;
}

export async function getJSON(path) {
  return (await request('GET', path)).json();
}

export async function getText(path) {
  return (await request('GET', path)).text();
}

// Server-sent events of a streamed completion: yields each event's data (without [DONE]).
export async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split('\n').filter((line) => line.startsWith('data:'))
        .map((line) => line.slice(5).replace(/^ /, '')).join('\n');
      if (data === '[DONE]') return;
      if (data) yield data;
    }
  }
}

// A multipart upload with progress (fetch cannot report upload progress; XHR can).
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', path);
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener('progress', (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener('load', () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(JSON.parse(xhr.responseText));
      else reject(failure(xhr.status, xhr.responseText));
    });
    xhr.addEventListener('error', () => reject(new ApiError(0, 'The upload failed: no answer from the server (connection closed).')));
    xhr.send(form);
  });
}
