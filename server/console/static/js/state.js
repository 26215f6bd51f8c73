// What the sections share: the models the server serves, and events when they change.

export const state = {
  base: null, // the base model's card from /v1/models
  adapters: [], // /v1/adapters cards
  served: {}, // model -> {requests, promptTokens, generatedTokens}, from /metrics
};

export function emit(name, detail) {
  document.dispatchEvent(new CustomEvent(name, { detail }));
}

export function on(name, handler) {
  document.addEventListener(name, (event) => handler(event.detail));
}

// Names a request's `model` field takes: the base model's id, then every adapter.
export function modelNames() {
  return [...(state.base ? [state.base.id] : []), ...state.adapters.map((a) => a.name)];
}
