// A file picker for the new-job form: uploads on selection and shows the API's per-line
// validation errors, or reuses a file uploaded earlier.
import { api, listData } from './api.js';
import { h } from './dom.js';
import { fmtBytes, fmtTime } from './format.js';

export function renderLineErrors(target, err) {
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
export function uploadField(label, key, required) {
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
    const files = listData(list).filter((f) => f && f.id && (!f.purpose || f.purpose === 'fine-tune'));
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
