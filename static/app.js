// sftd dashboard: a single-page app on the /v1 API. Plain ES module, no build step, works offline.
// Routes: #/ (jobs), #/new (new job), #/jobs/{id} (live job view).
import { fmtNum, fmtLR, fmtCount, fmtRate, fmtDuration, fmtBytes, fmtTime, fmtPct, toDate, DASH } from './format.js';
import { RunSeries, normalizeEvent, SSE_EVENT_NAMES, TERMINAL, pick, pickNum } from './series.js';

// ---------------------------------------------------------------------------------------------
// DOM helpers

const $ = (sel, root = document) => root.querySelector(sel);

/** Tiny element builder. Text is always text (never HTML), so API strings cannot inject markup. */
function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k in el && typeof v !== 'string' && k !== 'list') el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of kids.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function badge(status) {
  const s = String(status || 'unknown');
  return h('span', { class: `badge s-${s.replace(/[^a-z_]/gi, '')}`, 'data-status': s }, s.replace(/_/g, ' '));
}

/** A button that needs a second press within 4 s (no blocking confirm() dialogs). */
function twoStep(label, armedLabel, action, attrs = {}) {
  let timer = null;
  const btn = h('button', { type: 'button', class: 'danger', ...attrs }, label);
  const disarm = () => { clearTimeout(timer); btn.classList.remove('armed'); btn.textContent = label; };
  btn.addEventListener('click', async () => {
    if (!btn.classList.contains('armed')) {
      btn.classList.add('armed');
      btn.textContent = armedLabel;
      timer = setTimeout(disarm, 4000);
      return;
    }
    disarm();
    btn.disabled = true;
    try { await action(); } finally { btn.disabled = false; }
  });
  return btn;
}

// ---------------------------------------------------------------------------------------------
// API and auth

const KEY_STORAGE = 'sftd.apiKey';
let keyPrompt = null;
let keyDeclined = false; // the user closed the key dialog: don't ask again until they press "API key"

function apiKey() {
  try { return localStorage.getItem(KEY_STORAGE) || ''; } catch { return ''; }
}
function setKey(k) {
  try { if (k) localStorage.setItem(KEY_STORAGE, k); else localStorage.removeItem(KEY_STORAGE); } catch { /* private mode */ }
  $('#key-button').hidden = !k;
}
const authHeaders = () => (apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {});

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || (typeof body?.message === 'string' ? body.message : `HTTP ${status}`));
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

/** fetch + JSON + OpenAI-shaped errors; a 401 asks for the key and retries. */
async function api(path, { method = 'GET', json, body, headers = {}, signal } = {}) {
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

const jobPath = (id) => `v1/fine_tuning/jobs/${encodeURIComponent(id)}`;

// ---------------------------------------------------------------------------------------------
// Router

let teardown = null;
let firstRoute = true;

function setNav(which) {
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === which) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

function route() {
  if (teardown) { try { teardown(); } catch (e) { console.error(e); } teardown = null; }
  const main = $('#main');
  main.replaceChildren();
  const hash = location.hash || '#/';
  document.title = hash.startsWith('#/new') ? 'New job · sftd' : 'sftd';
  const m = hash.match(/^#\/jobs\/([^/?#]+)/);
  if (m) { setNav(null); teardown = jobView(main, decodeURIComponent(m[1])); }
  else if (hash.startsWith('#/new')) { setNav('new'); teardown = newJobView(main); }
  else { setNav('jobs'); teardown = jobsView(main); }
  if (!firstRoute) { window.scrollTo(0, 0); main.focus({ preventScroll: true }); }
  firstRoute = false;
}

// ---------------------------------------------------------------------------------------------
// Jobs view

const progressOf = (job) => (job && typeof job.progress === 'object' && job.progress) || {};

/**
 * For servers whose job objects carry no `progress`: a job's latest step, loss and throughput,
 * read from its event log (incrementally, while it runs) or from its last checkpoint (once it has
 * finished). Kept across visits to the list.
 */
const summaries = new Map(); // job id → {step, total_steps, train_loss, tokens_per_second, after, done}

async function summarize(job) {
  let sm = summaries.get(job.id);
  if (!sm) { sm = { after: null, done: false }; summaries.set(job.id, sm); }
  if (sm.done || sm.busy) return false;
  sm.busy = true;
  try {
    const followed = sm.after !== null;
    if (job.status === 'running' || (TERMINAL.has(job.status) && followed)) {
      // While it runs, and once more after it ends (the last steps since the previous look).
      if (TERMINAL.has(job.status)) sm.done = true;
      for (let page = 0; page < 20; page++) {
        const q = new URLSearchParams({ limit: '500' });
        if (sm.after !== null) q.set('after', String(sm.after));
        const list = await api(`${jobPath(job.id)}/events?${q}`);
        const data = Array.isArray(list?.data) ? list.data : [];
        for (const e of data) {
          const n = normalizeEvent('message', e, e.seq);
          if (n.seq !== null) sm.after = n.seq;
          if (n.kind !== 'metrics') continue;
          for (const k of ['step', 'total_steps', 'train_loss', 'tokens_per_second']) {
            const v = pickNum(k, n.data);
            if (v !== null) sm[k] = v;
          }
        }
        if (!list?.has_more || !data.length) break;
      }
      return true;
    }
    if (TERMINAL.has(job.status)) {
      sm.done = true;
      const list = await api(`${jobPath(job.id)}/checkpoints?limit=1`);
      const c = Array.isArray(list?.data) ? list.data[0] : null;
      if (!c) return false;
      const m = c.metrics || {};
      sm.step = pickNum('step', m, c) ?? (typeof c.step_number === 'number' ? c.step_number : undefined);
      sm.train_loss = pickNum('train_loss', m) ?? undefined;
      if (job.status === 'succeeded' && sm.step !== undefined) sm.total_steps = sm.step;
      return true;
    }
    return false;
  } catch {
    return false;
  } finally {
    sm.busy = false;
  }
}

function jobsView(root) {
  let alive = true; let timer = null; let limit = 50; let inflight = false;
  const note = h('p', { class: 'muted', 'data-testid': 'jobs-note', 'aria-live': 'polite' });
  const tbody = h('tbody');
  const cols = [['Job'], ['Status'], ['Model', 'hide-narrow'], ['Progress'], ['Loss', 'num'], ['Throughput', 'num hide-narrow'],
    ['Created', 'hide-narrow'], ['Finished', 'hide-narrow'], ['', '']];
  const table = h('table', { class: 'jobs', 'data-testid': 'jobs-table' },
    h('caption', { class: 'visually-hidden' }, 'Fine-tuning jobs, refreshed every 2 seconds'),
    h('thead', {}, h('tr', {}, cols.map(([t, c]) => h('th', { scope: 'col', class: c || '' }, t || h('span', { class: 'visually-hidden' }, 'Actions'))))),
    tbody);
  const empty = h('div', { class: 'empty card', hidden: true, 'data-testid': 'jobs-empty' },
    h('p', {}, 'No jobs yet.'), h('a', { href: '#/new', class: 'button primary' }, 'Start a fine-tuning job'));
  const more = h('button', { type: 'button', hidden: true, 'data-testid': 'jobs-more', onclick: () => { limit += 50; refresh(); } }, 'Show more');
  root.append(
    h('div', { class: 'pagehead' }, h('h1', {}, 'Jobs'), h('span', { class: 'spacer' }),
      h('a', { href: '#/new', class: 'button primary', 'data-testid': 'new-job-link' }, 'New job')),
    h('div', { class: 'tablewrap' }, table), empty, h('div', { class: 'row' }, more), note);

  const rows = new Map();

  function setCell(td, key, build) {
    if (td.dataset.sig === key) return;
    td.dataset.sig = key;
    td.replaceChildren(...[].concat(build()));
  }

  function makeRow(job) {
    const tds = cols.map(([, c]) => h('td', { class: c || '' }));
    const cancel = twoStep('Cancel', 'Confirm cancel', async () => {
      try { await api(`${jobPath(job.id)}/cancel`, { method: 'POST' }); note.textContent = `Cancellation requested for ${job.id}.`; } catch (e) { note.textContent = `Cancel failed: ${e.message}`; }
      refresh();
    }, { 'data-testid': 'job-cancel', 'aria-label': `Cancel job ${job.id}` });
    tds[8].append(cancel);
    const tr = h('tr', { 'data-testid': 'job-row', 'data-job-id': job.id }, tds);
    return { tr, tds, cancel };
  }

  function updateRow(r, job) {
    const p = job.progress && typeof job.progress === 'object' ? job.progress : (summaries.get(job.id) || {});
    const step = pickNum('step', p); const total = pickNum('total_steps', p);
    const loss = pickNum('train_loss', p); const tps = pickNum('tokens_per_second', p);
    const status = job.status || 'unknown';
    r.tr.dataset.status = status;
    setCell(r.tds[0], job.id, () => h('a', { href: `#/jobs/${encodeURIComponent(job.id)}`, class: 'mono', 'data-testid': 'job-link' }, job.id));
    setCell(r.tds[1], status, () => badge(status));
    setCell(r.tds[2], String(job.model), () => h('span', { class: 'mono' }, job.model ?? DASH));
    const pct = step !== null && total ? Math.min(100, (100 * step) / total) : (status === 'succeeded' ? 100 : null);
    const eta = toDate(job.estimated_finish);
    const etaText = status === 'running' && eta ? `ETA ${fmtDuration((eta.getTime() - Date.now()) / 1000)}` : null;
    setCell(r.tds[3], `${step}/${total}/${status}/${etaText}`, () => (pct === null ? (etaText || DASH) : [
      h('span', { class: 'minibar', role: 'img', 'aria-label': `${fmtPct(pct)} done` }, h('span', { style: `width:${pct}%` })),
      step !== null && total ? `${step} / ${total}` : fmtPct(pct)]));
    setCell(r.tds[4], String(loss), () => fmtNum(loss));
    setCell(r.tds[5], String(tps), () => (tps === null ? DASH : fmtRate(tps)));
    setCell(r.tds[6], String(job.created_at), () => h('time', { datetime: toDate(job.created_at)?.toISOString() }, fmtTime(job.created_at)));
    setCell(r.tds[7], String(job.finished_at), () => fmtTime(job.finished_at));
    r.cancel.hidden = TERMINAL.has(status);
  }

  function render(jobs) {
    const seen = new Set();
    let prev = null;
    for (const job of jobs) {
      if (!job || !job.id) continue;
      seen.add(job.id);
      let r = rows.get(job.id);
      if (!r) { r = makeRow(job); rows.set(job.id, r); }
      updateRow(r, job);
      const want = prev ? prev.nextSibling : tbody.firstChild;
      if (want !== r.tr) tbody.insertBefore(r.tr, want);
      prev = r.tr;
    }
    for (const [id, r] of rows) if (!seen.has(id)) { r.tr.remove(); rows.delete(id); }
    empty.hidden = rows.size > 0;
    table.hidden = rows.size === 0;
  }

  async function refresh() {
    if (!alive || inflight) return;
    clearTimeout(timer);
    inflight = true;
    try {
      const list = await api(`v1/fine_tuning/jobs?limit=${limit}`);
      if (!alive) return;
      const jobs = Array.isArray(list?.data) ? list.data : [];
      render(jobs);
      // Fill in progress the server did not send (in the background; rows update when it lands).
      for (const job of jobs) {
        if (!job?.id || (job.progress && typeof job.progress === 'object')) continue;
        if (job.status !== 'running' && !TERMINAL.has(job.status)) continue;
        summarize(job).then((changed) => { const r = rows.get(job.id); if (changed && r && alive) updateRow(r, job); });
      }
      more.hidden = !list?.has_more;
      if (note.dataset.err) { note.textContent = ''; delete note.dataset.err; }
    } catch (e) {
      if (!alive) return;
      note.textContent = `Could not load jobs: ${e.message}`;
      note.dataset.err = '1';
    } finally {
      inflight = false;
      if (alive) timer = setTimeout(refresh, 2000);
    }
  }
  refresh();
  return () => { alive = false; clearTimeout(timer); };
}

// ---------------------------------------------------------------------------------------------
// New job view

/** The recipe (DESIGN.md). Only fields changed from these are sent; the server fills in the rest. */
const MAIN_FIELDS = [
  { name: 'n_epochs', label: 'Epochs', def: 3, int: true, min: 1 },
  { name: 'learning_rate', label: 'Learning rate', def: 2e-4, display: '2e-4', min: 0, hint: 'peak, cosine with warmup' },
  { name: 'batch_size', label: 'Batch size', def: 4, int: true, min: 1 },
  { name: 'gradient_accumulation_steps', label: 'Gradient accumulation', def: 4, int: true, min: 1 },
  { name: 'max_seq_len', label: 'Max sequence length', def: 2048, int: true, min: 8 },
  { name: 'warmup_ratio', label: 'Warmup ratio', def: 0.1, min: 0, max: 1 },
  { name: 'lora.r', label: 'LoRA r', def: 16, int: true, min: 1 },
  { name: 'lora.alpha', label: 'LoRA alpha', def: 32, min: 0 },
  { name: 'lora.dropout', label: 'LoRA dropout', def: 0.05, min: 0, max: 1 },
];
const ADVANCED_FIELDS = [
  { name: 'max_steps', label: 'Max steps', def: '', int: true, min: 1, hint: 'stop after this many optimizer steps' },
  { name: 'lr_scheduler', label: 'LR schedule', def: 'cosine', options: ['cosine', 'linear', 'constant'] },
  { name: 'weight_decay', label: 'Weight decay', def: 0, min: 0 },
  { name: 'max_grad_norm', label: 'Max grad norm', def: 1, min: 0 },
  { name: 'eval_steps', label: 'Eval every N steps', def: '', int: true, min: 1 },
  { name: 'save_steps', label: 'Checkpoint every N steps', def: '', int: true, min: 1 },
  { name: 'loss_on', label: 'Loss on', def: 'assistant', options: ['assistant', 'all'] },
  { name: 'gradient_checkpointing', label: 'Gradient checkpointing', def: true, bool: true },
  { name: 'shuffle', label: 'Shuffle', def: true, bool: true },
  { name: 'lora.use_rslora', label: 'rsLoRA scaling', def: false, bool: true },
];
const TOP_FIELDS = [
  { name: 'seed', label: 'Seed', def: '', int: true, min: 0, top: true },
  { name: 'suffix', label: 'Suffix', def: '', text: true, top: true },
];

function fieldInput(f) {
  const id = `hp-${f.name.replace('.', '-')}`;
  const common = { id, name: f.name, 'data-testid': id, 'data-param': f.name };
  let input;
  if (f.options) {
    input = h('select', common, f.options.map((o) => h('option', { value: o, selected: o === f.def }, o)));
  } else if (f.bool) {
    input = h('input', { ...common, type: 'checkbox', checked: !!f.def });
    return h('div', { class: 'field check' }, input, h('label', { for: id }, f.label));
  } else if (f.text) {
    input = h('input', { ...common, type: 'text', value: f.def, autocomplete: 'off' });
  } else {
    input = h('input', {
      ...common, type: 'number', inputmode: f.int ? 'numeric' : 'decimal', step: f.int ? '1' : 'any',
      min: f.min !== undefined ? String(f.min) : undefined, max: f.max !== undefined ? String(f.max) : undefined,
      value: f.def === '' ? '' : (f.display ?? String(f.def)), placeholder: f.def === '' ? 'auto' : undefined,
    });
  }
  return h('div', { class: 'field' }, h('label', { for: id }, f.label), input,
    f.hint ? h('span', { class: 'hint' }, f.hint) : null);
}

function readField(form, f) {
  const el = form.elements.namedItem(f.name);
  if (!el) return undefined;
  if (f.bool) return el.checked === !!f.def ? undefined : el.checked;
  const raw = String(el.value).trim();
  if (raw === '' || raw === String(f.def)) return undefined;
  if (f.options || f.text) return raw;
  const v = Number(raw);
  if (!Number.isFinite(v)) throw new ApiError(400, { error: { message: `${f.label} must be a number`, param: f.name } });
  if (v === f.def) return undefined;
  return f.int ? Math.trunc(v) : v;
}

function renderLineErrors(target, err) {
  target.replaceChildren();
  const details = err.details || [];
  target.append(h('p', { class: 'error', role: 'alert', 'data-testid': 'file-error-message' },
    err.message, err.param ? ` (${err.param})` : ''));
  if (!details.length) return;
  const shown = details.slice(0, 500);
  target.append(h('ol', { class: 'lineerrors', 'data-testid': 'file-errors', 'aria-label': 'Invalid lines' },
    shown.map((d) => h('li', { 'data-testid': 'file-error', 'data-line': d.line ?? '' },
      h('span', { class: 'ln' }, d.line !== undefined && d.line !== null ? `line ${d.line}` : 'file'),
      d.code ? h('span', { class: 'code' }, d.code) : null,
      h('span', {}, d.message || '')))));
  if (details.length > shown.length) target.append(h('p', { class: 'muted' }, `… and ${details.length - shown.length} more.`));
}

/** A file picker that uploads on selection and shows the API's per-line validation errors. */
function uploadField(label, key, required) {
  const id = `${key}-input`;
  const input = h('input', { id, type: 'file', accept: '.jsonl,.json,application/jsonl,application/json', 'data-testid': key, required });
  const statusEl = h('div', { class: 'filestatus', 'data-testid': `${key}-status`, 'aria-live': 'polite' });
  const state = { fileId: null, pending: null, error: null };
  input.addEventListener('change', () => {
    state.fileId = null; state.error = null; statusEl.className = 'filestatus'; input.removeAttribute('aria-invalid');
    const file = input.files && input.files[0];
    if (!file) { statusEl.replaceChildren(); state.pending = null; return; }
    statusEl.replaceChildren(`Uploading ${file.name} (${fmtBytes(file.size)})…`);
    const fd = new FormData();
    fd.append('purpose', 'fine-tune');
    fd.append('file', file, file.name);
    const p = api('v1/files', { method: 'POST', body: fd }).then((f) => {
      if (state.pending !== p) return;
      state.fileId = f.id;
      statusEl.className = 'filestatus ok';
      statusEl.replaceChildren(`✓ ${f.filename || file.name} uploaded as `, h('code', { 'data-testid': `${key}-id` }, f.id),
        f.bytes !== undefined ? ` (${fmtBytes(f.bytes)})` : '');
    }, (e) => {
      if (state.pending !== p) return;
      state.error = e;
      input.setAttribute('aria-invalid', 'true');
      renderLineErrors(statusEl, e);
    });
    state.pending = p;
  });
  // Or reuse a file uploaded earlier.
  const existing = h('select', { id: `${key}-existing`, 'data-testid': `${key}-existing`, 'aria-label': `${label}: or reuse an uploaded file`, hidden: true },
    h('option', { value: '' }, '… or reuse an uploaded file'));
  existing.addEventListener('change', () => {
    if (!existing.value) return;
    input.value = '';
    input.removeAttribute('aria-invalid');
    state.pending = null; state.error = null; state.fileId = existing.value;
    statusEl.className = 'filestatus ok';
    statusEl.replaceChildren('✓ using ', h('code', { 'data-testid': `${key}-id` }, existing.value));
  });
  input.addEventListener('change', () => { existing.value = ''; });
  api('v1/files?purpose=fine-tune&limit=100').then((list) => {
    const files = (Array.isArray(list?.data) ? list.data : []).filter((f) => f && f.id && (!f.purpose || f.purpose === 'fine-tune'));
    if (!files.length) return;
    existing.append(...files.map((f) => h('option', { value: f.id }, `${f.filename || f.id} · ${fmtBytes(f.bytes)} · ${fmtTime(f.created_at)}`)));
    existing.hidden = false;
  }).catch(() => {});
  const el = h('div', { class: 'field' }, h('label', { for: id }, label), input, existing, statusEl);
  return {
    el, input,
    has: () => !!(input.files?.length || existing.value),
    async id() {
      if (state.pending) await state.pending;
      if (state.error) throw Object.assign(new Error(`${label}: ${state.error.message}`), { param: key });
      return state.fileId;
    },
  };
}

function newJobView(root) {
  let alive = true;
  const train = uploadField('Training file (JSONL)', 'training-file', true);
  const valid = uploadField('Validation file (optional)', 'validation-file', false);
  const modelList = h('datalist', { id: 'model-options' }, h('option', { value: 'sftd-demo' }, 'built-in demo model'));
  const modelHint = h('span', { class: 'hint', 'data-testid': 'model-hint' },
    'sftd-demo (built in), a local model directory, or a Hugging Face hub id such as Qwen/Qwen3-0.6B');
  const model = h('input', { id: 'model', name: 'model', type: 'text', value: 'sftd-demo', list: 'model-options', required: true, autocomplete: 'off', spellcheck: 'false', 'data-testid': 'model', 'data-param': 'model' });
  const errorBox = h('div', { class: 'formerror', role: 'alert', 'data-testid': 'form-error' });
  const submit = h('button', { type: 'submit', class: 'primary', 'data-testid': 'submit-job' }, 'Start fine-tuning');
  const form = h('form', { class: 'newjob', 'data-testid': 'new-job-form', novalidate: true },
    h('fieldset', {}, h('legend', {}, 'Data'), h('div', { class: 'fields wide' }, train.el, valid.el),
      h('p', { class: 'hint muted' }, 'Rows: {"messages":[…],"tools":[…]}, {"prompt","completion"} or {"text"}. Every line is checked on upload.')),
    h('fieldset', {}, h('legend', {}, 'Model'),
      h('div', { class: 'field' }, h('label', { for: 'model' }, 'Base model'), model, modelList, modelHint)),
    h('fieldset', {}, h('legend', {}, 'Hyperparameters'),
      h('p', { class: 'hint muted' }, 'Defaults are the recipe (LoRA r16/α32 on all linear layers, cosine LR). Fields you leave unchanged are left to the server.'),
      h('div', { class: 'fields' }, MAIN_FIELDS.map(fieldInput)),
      h('details', { 'data-testid': 'advanced' }, h('summary', {}, 'Advanced'),
        h('div', { class: 'fields' }, ADVANCED_FIELDS.map(fieldInput), TOP_FIELDS.map(fieldInput)))),
    errorBox, h('div', { class: 'row' }, submit));
  root.append(h('div', { class: 'pagehead' }, h('h1', {}, 'New fine-tuning job')), form);

  api('v1/models').then((list) => {
    if (!alive || !Array.isArray(list?.data)) return;
    for (const m of list.data) {
      const id = typeof m === 'string' ? m : m?.id;
      if (id && id !== 'sftd-demo') modelList.append(h('option', { value: id }, m.owned_by || m.description || ''));
    }
  }).catch(() => { /* 404 or older server: free text it is */ });

  function markInvalid(param) {
    for (const el of form.querySelectorAll('[aria-invalid]')) if (el.type !== 'file') el.removeAttribute('aria-invalid');
    if (!param) return;
    const parts = String(param).replace(/\[\d+\]/g, '').split('.');
    for (let i = 0; i < parts.length; i++) {
      const suffix = parts.slice(i).join('.');
      const el = form.querySelector(`[data-param="${CSS.escape(suffix)}"]`);
      if (el) { el.setAttribute('aria-invalid', 'true'); if (el.closest('details')) el.closest('details').open = true; el.focus(); return; }
    }
    if (/training_file/.test(param)) train.input.focus();
    else if (/validation_file/.test(param)) valid.input.focus();
  }

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    errorBox.replaceChildren();
    markInvalid(null);
    submit.disabled = true;
    const oldLabel = submit.textContent;
    submit.textContent = 'Submitting…';
    try {
      if (!train.has()) throw Object.assign(new Error('Choose a training file.'), { param: 'training_file' });
      const trainingFile = await train.id();
      const validationFile = valid.has() ? await valid.id() : null;
      const hp = {};
      const top = {};
      for (const f of [...MAIN_FIELDS, ...ADVANCED_FIELDS, ...TOP_FIELDS]) {
        const v = readField(form, f);
        if (v === undefined) continue;
        if (f.top) { top[f.name] = v; continue; }
        const [a, b] = f.name.split('.');
        if (b) (hp[a] ||= {})[b] = v; else hp[a] = v;
      }
      const body = {
        model: model.value.trim(),
        training_file: trainingFile,
        ...(validationFile ? { validation_file: validationFile } : {}),
        ...top,
        method: { type: 'supervised', supervised: { hyperparameters: hp } },
      };
      const job = await api('v1/fine_tuning/jobs', {
        method: 'POST', json: body,
        headers: { 'Idempotency-Key': (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2)) },
      });
      if (!alive) return;
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      if (!alive) return;
      errorBox.replaceChildren(h('strong', {}, 'Could not start the job: '), err.message,
        err.param ? h('span', { 'data-testid': 'form-error-param' }, ` (field: ${err.param})`) : '');
      markInvalid(err.param);
    } finally {
      submit.disabled = false;
      submit.textContent = oldLabel;
    }
  });
  return () => { alive = false; };
}

// ---------------------------------------------------------------------------------------------
// Job view: the live chart

const COLORS = { raw: 'rgba(0,114,178,0.45)', smooth: '#0072B2', eval: '#D55E00', lr: '#009E73', gn: '#CC79A7', grid: '#e8eaee', axis: '#3b3b44' };
const LOG_KINDS = new Set(['status', 'checkpoint', 'log', 'eval']);
const MAX_LOG = 1000;

function statsRow(label, testid) {
  const dd = h('dd', { 'data-testid': testid }, DASH);
  return { nodes: [h('dt', {}, label), dd], dd };
}

function jobView(root, id) {
  const series = new RunSeries();
  const st = {
    alive: true, job: null, streamStatus: null, es: null, terminal: false, reopenTimer: null,
    pollTimer: null, backoff: 1000, zoomed: false, emptyOpens: 0, gotSinceOpen: 0, chart: null, cursorIdx: null,
    smoothing: Number(localStorage.getItem('sftd.smoothing') ?? 0.6), log: localStorage.getItem('sftd.logScale') === '1',
    gradNorm: localStorage.getItem('sftd.gradNorm') === '1', lastCheckpoint: null, drawPending: false, resultsFor: null,
  };
  if (!(st.smoothing >= 0 && st.smoothing < 1)) st.smoothing = 0.6;
  window.__sftd = { points: 0, status: null, lastSeq: null, steps: [], duplicates: 0, evalPoints: 0, stream: 'connecting' };

  // --- layout
  const statusSlot = h('span', { 'data-testid': 'job-status', 'aria-live': 'polite' }, badge('loading'));
  const cancelBtn = twoStep('Cancel job', 'Confirm cancel', async () => {
    try { await api(`${jobPath(id)}/cancel`, { method: 'POST' }); addLog({ kind: 'log', level: 'info', message: 'cancellation requested' }); refreshJob(); } catch (e) { addLog({ kind: 'log', level: 'error', message: `cancel failed: ${e.message}` }); }
  }, { 'data-testid': 'job-cancel', hidden: true });
  const streamState = h('span', { class: 'streamstate', 'data-testid': 'stream-state', 'aria-live': 'polite' }, 'connecting…');
  const title = h('h1', {}, h('span', { class: 'mono', 'data-testid': 'job-id' }, id));
  const modelLine = h('span', { class: 'muted mono', 'data-testid': 'job-model' });
  root.append(h('div', { class: 'pagehead' },
    h('a', { href: '#/', 'aria-label': 'Back to jobs' }, '← Jobs'), title, statusSlot, modelLine,
    h('span', { class: 'spacer' }), streamState, cancelBtn));
  const errorBanner = h('div', { class: 'formerror', role: 'alert', 'data-testid': 'job-error' });

  const chartEl = h('div', {
    class: 'chart', 'data-testid': 'chart', tabindex: '0', role: 'img',
    'aria-label': 'Training loss chart. Use the left and right arrow keys to read each step.',
  });
  const chartEmpty = h('div', { class: 'chartempty', 'data-testid': 'chart-empty' }, 'Waiting for the first optimizer step…');
  chartEl.hidden = true;
  const hoverLine = h('div', { class: 'hoverline', 'data-testid': 'hover-readout', 'aria-live': 'off' });
  const smoothOut = h('output', { for: 'smoothing', 'data-testid': 'smoothing-value' }, st.smoothing.toFixed(2));
  const smooth = h('input', {
    id: 'smoothing', type: 'range', min: '0', max: '0.99', step: '0.01', value: String(st.smoothing), 'data-testid': 'smoothing',
    oninput: () => { st.smoothing = Number(smooth.value); smoothOut.textContent = st.smoothing.toFixed(2); localStorage.setItem('sftd.smoothing', String(st.smoothing)); scheduleDraw(); },
  });
  const logBox = h('input', { type: 'checkbox', id: 'logscale', checked: st.log, 'data-testid': 'log-scale', onchange: () => { st.log = logBox.checked; localStorage.setItem('sftd.logScale', st.log ? '1' : '0'); rebuildChart(); } });
  const gnBox = h('input', { type: 'checkbox', id: 'gradnorm', checked: st.gradNorm, 'data-testid': 'grad-norm', onchange: () => { st.gradNorm = gnBox.checked; localStorage.setItem('sftd.gradNorm', st.gradNorm ? '1' : '0'); rebuildChart(); } });
  const controls = h('div', { class: 'chartcontrols' },
    h('label', { for: 'smoothing' }, 'Smoothing', smooth, smoothOut),
    h('label', { for: 'logscale' }, logBox, 'Log scale'),
    h('label', { for: 'gradnorm' }, gnBox, 'Grad norm'));
  const chartCard = h('section', { class: 'card chartcard', 'aria-label': 'Loss chart' }, chartEmpty, chartEl, hoverLine, controls);

  const rows = {
    step: statsRow('Step', 'stat-step'), epoch: statsRow('Epoch', 'stat-epoch'),
    loss: statsRow('Train loss', 'stat-loss'), smooth: statsRow('Smoothed', 'stat-smoothed'),
    eval: statsRow('Eval loss', 'stat-eval'), acc: statsRow('Token accuracy', 'stat-accuracy'),
    lr: statsRow('Learning rate', 'stat-lr'), tps: statsRow('Throughput', 'stat-tps'),
    tokens: statsRow('Tokens seen', 'stat-tokens'), elapsed: statsRow('Elapsed', 'stat-elapsed'),
    eta: statsRow('ETA', 'stat-eta'), device: statsRow('Device', 'stat-device'),
  };
  for (const n of rows.device.nodes) n.hidden = true;
  const progress = h('progress', { max: '1', value: '0', 'data-testid': 'progress', 'aria-label': 'Training progress' });
  const progressLeft = h('span', { 'data-testid': 'progress-label' }, DASH);
  const progressRight = h('span', {}, '');
  const statsCard = h('section', { class: 'card', 'aria-label': 'Progress' },
    h('h2', {}, 'Progress'), progress, h('div', { class: 'progresslabel' }, progressLeft, progressRight),
    h('dl', { class: 'stats' }, Object.values(rows).map((r) => r.nodes)));
  const filesList = h('ul', { class: 'files', 'data-testid': 'result-files' });
  const filesCard = h('section', { class: 'card', 'aria-label': 'Results', hidden: true }, h('h2', {}, 'Results'), filesList);
  const ckptBody = h('tbody');
  const ckptCard = h('section', { class: 'card', 'aria-label': 'Checkpoints', hidden: true },
    h('h2', {}, 'Checkpoints'),
    h('table', { class: 'ckpts', 'data-testid': 'checkpoints' },
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Step'), h('th', { scope: 'col' }, 'Train loss'), h('th', { scope: 'col' }, 'Eval loss'))),
      ckptBody));
  const hpList = h('dl', { class: 'hp', 'data-testid': 'job-hyperparameters' });
  const hpCard = h('section', { class: 'card', 'aria-label': 'Settings' },
    h('details', {}, h('summary', {}, 'Settings'), hpList));
  const logList = h('ol', { class: 'eventlog', 'data-testid': 'event-log' });
  const logCard = h('section', { class: 'card', 'aria-label': 'Event log' }, h('h2', {}, 'Events'),
    h('div', { role: 'log', 'aria-label': 'Event log' }, logList));

  chartCard.classList.add('area-chart');
  logCard.classList.add('area-log');
  root.append(errorBanner, h('div', { class: 'jobgrid' },
    chartCard, h('div', { class: 'side area-side' }, statsCard, filesCard, ckptCard, hpCard), logCard));

  // --- status

  function shownStatus() {
    const js = st.job?.status; const ss = st.streamStatus;
    if (ss && TERMINAL.has(ss)) return ss;
    if (js && TERMINAL.has(js)) return js;
    return ss || js || null;
  }
  function renderStatus() {
    const s = shownStatus();
    if (!s) return;
    if (statusSlot.dataset.status !== s) {
      statusSlot.dataset.status = s;
      statusSlot.replaceChildren(badge(s));
    }
    cancelBtn.hidden = TERMINAL.has(s);
    window.__sftd.status = s;
    updateTitle();
    if (s === 'succeeded' && progress.max > 0 && !series.latest) progress.value = progress.max;
    if (TERMINAL.has(s)) loadResults();
  }

  function updateTitle() {
    const s = shownStatus();
    const m = series.latest;
    const prog = m && m.total_steps ? ` ${m.step}/${m.total_steps}` : '';
    document.title = `${s ? `${s}${s === 'running' ? prog : ''} · ` : ''}${id} · sftd`;
  }

  // --- event log

  function addLog(ev) {
    const t = toDate(ev.createdAt) || new Date();
    const p = (x) => String(x).padStart(2, '0');
    const d = ev.data || {};
    let text = ev.message || '';
    if (ev.kind === 'status') text = `status → ${ev.status}${ev.message ? ` — ${ev.message}` : ''}`;
    else if (ev.kind === 'checkpoint' && !text) text = `checkpoint at step ${pick('step', d) ?? '?'}`;
    else if (ev.kind === 'eval') text = `eval loss ${fmtNum(pickNum('eval_loss', d))} at step ${pick('step', d) ?? '?'}`;
    if (ev.kind === 'status' && d.error && typeof d.error === 'object' && d.error.message) text += ` — ${d.error.message}`;
    const level = ev.kind === 'status' && ev.status === 'failed' ? 'error' : ev.level;
    const li = h('li', { class: `l-${level} k-${ev.kind}`, 'data-kind': ev.kind, 'data-level': level },
      h('span', { class: 't' }, `${p(t.getHours())}:${p(t.getMinutes())}:${p(t.getSeconds())}`), h('span', {}, text || ev.kind));
    const atBottom = logList.scrollHeight - logList.scrollTop - logList.clientHeight < 30;
    logList.append(li);
    while (logList.childElementCount > MAX_LOG) logList.firstElementChild.remove();
    if (atBottom) logList.scrollTop = logList.scrollHeight;
  }

  // --- job object

  function renderJob(job) {
    st.job = job;
    modelLine.textContent = job.fine_tuned_model ? `${job.model} → ${job.fine_tuned_model}` : (job.model || '');
    const dev = job.device ?? progressOf(job).device ?? job.metadata?.device;
    if (dev) { rows.device.dd.textContent = String(dev); for (const n of rows.device.nodes) n.hidden = false; }
    const hp = (job.hyperparameters && typeof job.hyperparameters === 'object' ? job.hyperparameters : null) || job.method?.supervised?.hyperparameters || {};
    const flat = [];
    const walk = (o, pre) => { for (const [k, v] of Object.entries(o || {})) { if (v && typeof v === 'object' && !Array.isArray(v)) walk(v, `${pre}${k}.`); else flat.push([`${pre}${k}`, Array.isArray(v) ? v.join(', ') : String(v)]); } };
    walk(hp, '');
    for (const k of ['training_file', 'validation_file', 'seed', 'created_at', 'finished_at', 'trained_tokens']) {
      if (job[k] !== undefined && job[k] !== null) flat.push([k, k.endsWith('_at') ? fmtTime(job[k]) : String(job[k])]);
    }
    hpList.replaceChildren(...flat.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
    if (job.error && (job.error.message || typeof job.error === 'string')) {
      errorBanner.textContent = `Job failed: ${job.error.message || job.error}${job.error.param ? ` (${job.error.param})` : ''}`;
    }
    if (!series.latest) {
      const p = progressOf(job);
      const step = pickNum('step', p); const total = pickNum('total_steps', p);
      if (total) { progress.max = total; progress.value = step ?? 0; progressLeft.textContent = `${step ?? 0} / ${total}`; }
    }
    renderStatus();
  }

  async function refreshJob() {
    try {
      const job = await api(jobPath(id));
      if (!st.alive) return null;
      renderJob(job);
      return job;
    } catch (e) {
      if (!st.alive) return null;
      if (e.status === 404) { errorBanner.textContent = `No job ${id} on this server.`; closeStream(); st.terminal = true; }
      else if (e.status !== 401) errorBanner.textContent = `Could not load the job: ${e.message}`;
      return null;
    }
  }

  function loadResults() {
    const files = Array.isArray(st.job?.result_files) ? st.job.result_files : [];
    const key = files.join(',');
    if (!files.length) {
      // The terminal event can land a moment before the job lists its files: look again a few
      // times (one timer at a time).
      if (shownStatus() === 'succeeded' && st.alive && !st.resultsTimer && (st.resultsTries || 0) < 8) {
        st.resultsTries = (st.resultsTries || 0) + 1;
        st.resultsTimer = setTimeout(async () => {
          if (st.alive) await refreshJob();
          st.resultsTimer = null;
          if (st.alive) loadResults();
        }, 750);
      }
      return;
    }
    if (st.resultsFor === key) return;
    st.resultsFor = key;
    filesCard.hidden = false;
    filesList.replaceChildren(...files.map((fid) => {
      const fileId = typeof fid === 'object' && fid ? fid.id : fid;
      const href = `v1/files/${encodeURIComponent(fileId)}/content`;
      const a = h('a', { href, 'data-testid': 'result-file', 'data-file-id': fileId, download: '' }, fileId);
      const meta = h('span', { class: 'muted' });
      a.addEventListener('click', (e) => {
        if (!apiKey()) return; // a plain link works when the server has no key
        e.preventDefault();
        downloadWithKey(href, a.getAttribute('download') || fileId);
      });
      api(`v1/files/${encodeURIComponent(fileId)}`).then((f) => {
        if (f?.filename) { a.textContent = f.filename; a.setAttribute('download', f.filename); a.dataset.filename = f.filename; }
        if (f?.bytes !== undefined) meta.textContent = ` ${fmtBytes(f.bytes)}`;
      }).catch(() => {});
      return h('li', {}, a, meta);
    }));
  }

  // --- checkpoints (step, train and eval loss of each saved adapter: which one to keep)

  function scheduleCheckpoints() {
    if (st.ckptTimer) return;
    st.ckptTimer = setTimeout(loadCheckpoints, 1500);
  }
  async function loadCheckpoints() {
    st.ckptTimer = null;
    try {
      const list = await api(`${jobPath(id)}/checkpoints?limit=100`);
      if (!st.alive) return;
      const data = (Array.isArray(list?.data) ? list.data : []).slice()
        .sort((a, b) => (b.step_number ?? 0) - (a.step_number ?? 0));
      ckptCard.hidden = data.length === 0;
      ckptBody.replaceChildren(...data.map((c) => {
        const m = c.metrics || {};
        const step = typeof c.step_number === 'number' ? c.step_number : pickNum('step', m);
        return h('tr', { 'data-step': step ?? '' },
          h('td', {}, step ?? DASH), h('td', {}, fmtNum(pickNum('train_loss', m))),
          h('td', {}, fmtNum(pickNum('eval_loss', m))));
      }));
    } catch { /* older server without the route: keep the card hidden */ }
  }
  loadCheckpoints();

  // --- stream

  function setStreamState(text, warn = false) {
    streamState.textContent = text;
    streamState.classList.toggle('warn', warn);
    window.__sftd.stream = text;
  }

  function onSse(name, e) {
    if (!st.alive) return;
    let raw;
    try { raw = JSON.parse(e.data); } catch { raw = { message: String(e.data ?? '') }; }
    const ev = normalizeEvent(name, raw, e.lastEventId);
    if (name === 'error' && ev.kind === 'log') ev.level = ev.level === 'info' ? 'error' : ev.level;
    if (!series.acceptSeq(ev.seq)) { window.__sftd.duplicates = series.duplicates; return; }
    st.gotSinceOpen++;
    window.__sftd.lastSeq = series.lastSeq;
    handle(ev);
  }

  /** Event kind → what it does (names are mapped to kinds in series.js EVENT_KINDS). */
  const HANDLERS = {
    metrics: (ev) => {
      if (series.addMetrics(ev.data)) scheduleDraw();
      if (pickNum('eval_loss', ev.data) !== null) HANDLERS.eval(ev); // OpenAI-style combined record
    },
    eval: (ev) => { if (series.addEval(ev.data)) scheduleDraw(); addLog(ev); },
    checkpoint: (ev) => { st.lastCheckpoint = pickNum('step', ev.data); addLog(ev); scheduleCheckpoints(); },
    log: (ev) => { addLog(ev); },
    heartbeat: () => {},
    status: (ev) => {
      if (ev.status) {
        st.streamStatus = ev.status;
        if (ev.data && ev.data.error && ev.data.error.message) errorBanner.textContent = `Job failed: ${ev.data.error.message}`;
      }
      addLog(ev);
      renderStatus();
      if (ev.status && TERMINAL.has(ev.status)) {
        st.terminal = true;
        closeStream();
        setStreamState('complete');
        scheduleDraw();
        refreshJob();
        clearTimeout(st.ckptTimer); st.ckptTimer = null;
        scheduleCheckpoints(); // the final adapter's checkpoint may be recorded with the last status
      }
    },
  };
  function handle(ev) { (HANDLERS[ev.kind] || HANDLERS.log)(ev); }

  function closeStream() {
    clearTimeout(st.reopenTimer);
    if (st.es) { st.es.close(); st.es = null; }
  }

  function openStream() {
    if (!st.alive || st.terminal) return;
    closeStream();
    const params = new URLSearchParams({ stream: 'true' });
    if (series.lastSeq !== null) params.set('after', String(series.lastSeq));
    if (apiKey()) params.set('access_token', apiKey());
    const es = new EventSource(`${jobPath(id)}/events?${params}`);
    st.es = es;
    st.gotSinceOpen = 0;
    es.onopen = () => { if (st.es === es) { setStreamState('live'); st.backoff = 1000; } };
    es.onmessage = (e) => onSse('message', e);
    for (const name of SSE_EVENT_NAMES) es.addEventListener(name, (e) => onSse(name, e));
    es.onerror = (e) => {
      if (st.es !== es) return;
      if (typeof e?.data === 'string') { onSse('error', e); return; } // a server-sent `event: error`
      if (st.terminal) { closeStream(); return; }
      st.emptyOpens = st.gotSinceOpen === 0 ? st.emptyOpens + 1 : 0;
      st.gotSinceOpen = 0;
      if (es.readyState === EventSource.CLOSED) {
        setStreamState('disconnected — retrying', true);
        scheduleReopen();
      } else {
        setStreamState('reconnecting…', true);
        // The browser retries by itself (sending Last-Event-ID). If it keeps failing, check the job
        // (this also asks for the API key on 401) and reopen from our own position.
        if (st.emptyOpens >= 3) scheduleReopen();
      }
    };
  }

  function scheduleReopen() {
    clearTimeout(st.reopenTimer);
    if (st.es) { st.es.close(); st.es = null; }
    const delay = st.backoff;
    st.backoff = Math.min(st.backoff * 2, 10000);
    st.reopenTimer = setTimeout(async () => {
      if (!st.alive || st.terminal) return;
      const job = await refreshJob();
      if (!st.alive || st.terminal) return;
      if (job && TERMINAL.has(job.status) && st.emptyOpens >= 4) {
        // The stream has nothing more to give (its terminal event was never delivered).
        st.terminal = true; setStreamState('complete'); return;
      }
      openStream();
    }, delay);
  }

  // --- chart

  function chartHeight() {
    const w = window.innerWidth;
    return w < 600 ? 260 : Math.max(300, Math.min(440, window.innerHeight - 330));
  }

  function fmtHover(u, idx) {
    if (idx === null || idx === undefined) { hoverLine.textContent = ''; return; }
    const x = u.data[0][idx];
    const m = series.metrics.get(x); const ev = series.evals.get(x);
    const parts = [`step ${x}`];
    if (m) {
      if (m.epoch !== null) parts.push(`epoch ${fmtNum(m.epoch, 3)}`);
      parts.push(`loss ${fmtNum(m.train_loss)}`);
      const sm = u.data[2][idx];
      if (sm !== null && sm !== undefined) parts.push(`smoothed ${fmtNum(sm)}`);
      parts.push(`lr ${fmtLR(m.learning_rate)}`);
      if (m.grad_norm !== null) parts.push(`grad norm ${fmtNum(m.grad_norm, 3)}`);
      if (m.train_mean_token_accuracy !== null) parts.push(`accuracy ${fmtPct(100 * m.train_mean_token_accuracy)}`);
      if (m.tokens_per_second !== null) parts.push(fmtRate(m.tokens_per_second));
    }
    if (ev) parts.push(`eval loss ${fmtNum(ev.eval_loss)}`);
    hoverLine.textContent = parts.join(' · ');
  }

  function chartOpts() {
    const fmt = (f) => (u, v) => (v === null || v === undefined ? DASH : f(v));
    const axisBase = { stroke: COLORS.axis, grid: { stroke: COLORS.grid, width: 1 }, ticks: { stroke: COLORS.grid, width: 1 } };
    const axes = [
      { ...axisBase, label: 'step', labelSize: 20, values: (u, vals) => vals.map((v) => (Number.isInteger(v) ? fmtCount(v) : '')) },
      { ...axisBase, scale: 'loss', label: 'loss', labelSize: 20, size: 56, values: (u, vals) => vals.map((v) => (v === null || v === undefined ? '' : fmtNum(v, 3))) },
      { ...axisBase, scale: 'lr', side: 1, label: 'learning rate', labelSize: 20, size: 60, grid: { show: false }, values: (u, vals) => vals.map((v) => (v === null || v === undefined ? '' : fmtLR(v))) },
    ];
    if (st.gradNorm) axes.push({ ...axisBase, scale: 'gn', side: 1, label: 'grad norm', labelSize: 20, size: 50, grid: { show: false }, values: (u, vals) => vals.map((v) => (v === null || v === undefined ? '' : fmtNum(v, 3))) });
    return {
      width: Math.max(280, chartEl.clientWidth || chartCard.clientWidth - 24 || 600),
      height: chartHeight(),
      scales: {
        x: { time: false },
        loss: st.log ? { distr: 3, log: 10 } : { auto: true },
        lr: { auto: true, range: (u, min, max) => [0, max > 0 ? max * 1.05 : 1] },
        gn: { auto: true },
      },
      axes,
      series: [
        { label: 'step', value: fmt((v) => String(v)) },
        { label: 'loss (raw)', scale: 'loss', stroke: COLORS.raw, width: 1, spanGaps: true, value: fmt(fmtNum), points: { show: false } },
        { label: 'loss (smoothed)', scale: 'loss', stroke: COLORS.smooth, width: 2.25, spanGaps: true, value: fmt(fmtNum), points: { show: false } },
        { label: 'eval loss', scale: 'loss', stroke: COLORS.eval, width: 2, paths: () => null, value: fmt(fmtNum), points: { show: true, size: 9, width: 2, stroke: COLORS.eval, fill: '#fff' } },
        { label: 'learning rate', scale: 'lr', stroke: COLORS.lr, width: 1.5, dash: [6, 4], spanGaps: true, value: fmt(fmtLR), points: { show: false } },
        { label: 'grad norm', scale: 'gn', stroke: COLORS.gn, width: 1.5, dash: [2, 3], spanGaps: true, show: st.gradNorm, value: fmt((v) => fmtNum(v, 3)), points: { show: false } },
      ],
      legend: { live: false },
      cursor: { drag: { x: true, y: false }, points: { size: 7 } },
      hooks: {
        setCursor: [(u) => { st.cursorIdx = u.cursor.idx; fmtHover(u, u.cursor.idx); }],
        setSelect: [(u) => { if (u.select.width > 0) st.zoomed = true; }],
      },
    };
  }

  function rebuildChart() {
    if (st.chart) { st.chart.destroy(); st.chart = null; }
    st.zoomed = false;
    scheduleDraw();
  }

  function draw() {
    if (!st.alive) return;
    const cols = series.columns(st.smoothing, { positiveOnly: st.log });
    const points = series.points;
    if (points > 0 || series.evals.size > 0) {
      chartEmpty.hidden = true;
      chartEl.hidden = false;
      if (!st.chart) {
        st.chart = new uPlot(chartOpts(), cols, chartEl);
      } else {
        if (st.zoomed) {
          // Keep the user's zoom while new steps arrive.
          const { min, max } = st.chart.scales.x;
          st.chart.setData(cols);
          st.chart.setScale('x', { min, max });
        } else {
          st.chart.setData(cols);
        }
      }
    }
    if (!st.chart && TERMINAL.has(shownStatus())) chartEmpty.textContent = 'No training steps were recorded for this job.';
    updateStats(cols);
    updateTitle();
    window.__sftd.points = points;
    window.__sftd.evalPoints = series.evals.size;
    window.__sftd.steps = series.steps();
    window.__sftd.duplicates = series.duplicates;
    chartEl.dataset.points = String(points);
  }

  function scheduleDraw() {
    if (st.drawPending) return;
    st.drawPending = true;
    const run = () => { if (!st.drawPending) return; st.drawPending = false; draw(); };
    requestAnimationFrame(run);
    setTimeout(run, 250); // background tabs get no animation frames
  }

  function updateStats(cols) {
    const m = series.latest;
    if (!m) return;
    const total = m.total_steps || st.job?.progress?.total_steps || null;
    if (total) {
      progress.max = total; progress.value = Math.min(m.step, total);
      progressLeft.textContent = `step ${m.step} / ${total}`;
      progressRight.textContent = fmtPct((100 * m.step) / total);
    }
    rows.step.dd.textContent = total ? `${m.step} / ${total}` : String(m.step);
    const nEpochs = st.job?.hyperparameters?.n_epochs ?? st.job?.method?.supervised?.hyperparameters?.n_epochs;
    rows.epoch.dd.textContent = m.epoch === null ? DASH : `${fmtNum(m.epoch, 3)}${typeof nEpochs === 'number' ? ` / ${nEpochs}` : ''}`;
    rows.loss.dd.textContent = fmtNum(m.train_loss);
    const sm = cols[2].filter((v) => v !== null);
    rows.smooth.dd.textContent = sm.length ? fmtNum(sm[sm.length - 1]) : DASH;
    rows.eval.dd.textContent = series.latestEval ? `${fmtNum(series.latestEval.eval_loss)} @ ${series.latestEval.step}` : DASH;
    rows.acc.dd.textContent = m.train_mean_token_accuracy === null ? DASH : fmtPct(100 * m.train_mean_token_accuracy);
    rows.lr.dd.textContent = fmtLR(m.learning_rate);
    rows.tps.dd.textContent = fmtRate(m.tokens_per_second);
    rows.tokens.dd.textContent = fmtCount(m.num_tokens);
    rows.elapsed.dd.textContent = fmtDuration(m.elapsed_seconds);
    const done = TERMINAL.has(shownStatus());
    rows.eta.dd.textContent = done ? DASH : fmtDuration(m.eta_seconds);
  }

  chartEl.addEventListener('dblclick', () => { st.zoomed = false; });

  // Keyboard: arrows move the chart cursor step by step.
  chartEl.addEventListener('keydown', (e) => {
    const u = st.chart;
    if (!u || !u.data[0].length) return;
    const n = u.data[0].length;
    let i = st.cursorIdx ?? n - 1;
    if (e.key === 'ArrowLeft') i = Math.max(0, i - 1);
    else if (e.key === 'ArrowRight') i = Math.min(n - 1, i + 1);
    else if (e.key === 'Home') i = 0;
    else if (e.key === 'End') i = n - 1;
    else if (e.key === 'PageUp') i = Math.max(0, i - 10);
    else if (e.key === 'PageDown') i = Math.min(n - 1, i + 10);
    else return;
    e.preventDefault();
    // Stay inside the visible (possibly zoomed) range.
    const xs = u.data[0];
    const { min, max } = u.scales.x;
    while (i < n - 1 && xs[i] < min) i++;
    while (i > 0 && xs[i] > max) i--;
    const y = u.data[2][i] ?? u.data[3][i];
    u.setCursor({ left: u.valToPos(u.data[0][i], 'x'), top: y === null || y === undefined ? u.bbox.height / (2 * devicePixelRatio) : u.valToPos(y, 'loss') });
  });

  const ro = new ResizeObserver(() => {
    if (!st.chart) return;
    const w = Math.max(280, chartEl.clientWidth);
    const hgt = chartHeight();
    if (Math.abs(st.chart.width - w) > 1 || st.chart.height !== hgt) st.chart.setSize({ width: w, height: hgt });
  });
  ro.observe(chartCard);

  // --- start
  refreshJob().then((job) => {
    if (!st.alive) return;
    openStream();
    const poll = async () => {
      if (!st.alive) return;
      if (!TERMINAL.has(shownStatus())) await refreshJob();
      st.pollTimer = setTimeout(poll, 5000);
    };
    st.pollTimer = setTimeout(poll, 5000);
    return job;
  });

  return () => {
    st.alive = false;
    closeStream();
    clearTimeout(st.pollTimer);
    clearTimeout(st.resultsTimer);
    clearTimeout(st.ckptTimer);
    ro.disconnect();
    if (st.chart) st.chart.destroy();
  };
}

function downloadWithKey(href, name) {
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

// ---------------------------------------------------------------------------------------------
// Boot

$('#key-button').hidden = !apiKey();
$('#key-button').addEventListener('click', () => {
  keyDeclined = false;
  requestKey(false).then(() => route(), () => {});
});
window.addEventListener('hashchange', route);
window.__sftdApi = { api, apiKey, setKey };
route();
