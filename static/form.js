// The new-job form (#/new): data files, base model and hyperparameters prefilled with the
// recipe. Only values the user changed are sent; the server fills in the rest.
import { api, ApiError, listData } from './api.js';
import { h } from './dom.js';
import { uploadField } from './upload.js';

/** The recipe, as the server's defaults (HyperparametersIn in openapi.yaml). */
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

export function newJobView(root) {
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
    if (!alive) return;
    for (const m of listData(list)) {
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
