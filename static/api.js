// The /v1 API client: fetch + JSON + OpenAI-shaped errors, and the API key (asked for once in a
// dialog on the first 401, kept in localStorage, sent as a Bearer header or `access_token`).
import { $, h, prefs } from './dom.js';

const KEY_STORAGE = 'sftd.apiKey';
let keyPrompt = null;
let keyDeclined = false; // the user closed the key dialog: don't ask again until they press "API key"

export const apiKey = () => prefs.get(KEY_STORAGE) || '';
export const authHeaders = () => (apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {});

function setKey(k) {
  if (k) prefs.set(KEY_STORAGE, k); else prefs.remove(KEY_STORAGE);
  $('#key-button').hidden = !k;
}

export const jobPath = (id) => `v1/fine_tuning/jobs/${encodeURIComponent(id)}`;

export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.type = e.type;
    this.param = e.param;
    this.code = e.code;
    this.details = Array.isArray(e.details) ? e.details : [];
  }
}

/** Ask for the API key (one dialog however many requests are waiting). Rejects on cancel. */
function requestKey(rejected) {
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve, reject) => {
    const dlg = $('#key-dialog'); const form = $('#key-form'); const input = $('#key-input');
    const cancel = $('#key-cancel');
    $('#key-error').textContent = rejected ? 'That key was not accepted. Enter the server’s API key.' : '';
    input.value = '';
    const finish = (ok) => {
      form.removeEventListener('submit', onSubmit);
      cancel.removeEventListener('click', onCancel);
      dlg.removeEventListener('cancel', onCancel);
      if (dlg.open) dlg.close();
      keyPrompt = null;
      keyDeclined = !ok;
      if (!ok) $('#key-button').hidden = false;
      if (ok) resolve();
      else reject(new ApiError(401, { error: { message: 'This server needs an API key.', type: 'authentication_error' } }));
    };
    const onSubmit = (e) => {
      e.preventDefault();
      const v = input.value.trim();
      if (!v) return;
      setKey(v);
      finish(true);
    };
    const onCancel = (e) => { e.preventDefault(); finish(false); };
    form.addEventListener('submit', onSubmit);
    cancel.addEventListener('click', onCancel);
    dlg.addEventListener('cancel', onCancel);
    dlg.showModal();
    input.focus();
  });
  return keyPrompt;
}

/** The header's "API key" button: shown once a key is stored; pressing it (re)asks for the key. */
export function initKeyButton(onKey) {
  const btn = $('#key-button');
  btn.hidden = !apiKey();
  btn.addEventListener('click', () => {
    keyDeclined = false;
    requestKey(false).then(onKey, () => {});
  });
}

/** fetch + JSON + OpenAI-shaped errors; a 401 asks for the key and retries. */
export async function api(path, { method = 'GET', json, body, headers = {}, signal } = {}) {
  for (let attempt = 0; ; attempt++) {
    const hdrs = { Accept: 'application/json', ...authHeaders(), ...headers };
    let payload = body;
    if (json !== undefined) { hdrs['Content-Type'] = 'application/json'; payload = JSON.stringify(json); }
    const hadKey = !!apiKey();
    const res = await fetch(path, { method, headers: hdrs, body: payload, signal });
    if (res.status === 401 && attempt < 5 && !keyDeclined) {
      await requestKey(hadKey || attempt > 0);
      continue;
    }
    const text = await res.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch { data = { error: { message: text.slice(0, 500) } }; }
    }
    if (!res.ok) throw new ApiError(res.status, data);
    return data;
  }
}

/** The `data` array of a list response (empty when there is none). */
export const listData = (list) => (Array.isArray(list?.data) ? list.data : []);

/** Download through fetch with the key (a plain link cannot send the Authorization header). */
export function downloadWithKey(href, name) {
  fetch(href, { headers: authHeaders() }).then(async (res) => {
    if (res.status === 401) { await requestKey(true); return downloadWithKey(href, name); }
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const blob = await res.blob();
    const url = URL.createObjectURL(blob);
    const a = h('a', { href: url, download: name });
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }).catch((e) => alert(`Download failed: ${e.message}`));
}
