// The job's event stream as chart data: event normalisation, de-duplication and smoothing.
// Pure (no DOM): unit-tested under node, used by app.js in the browser.

export const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);

/**
 * SSE event name (or the payload's `type`) → the handler kind. The one place that knows the
 * stream's vocabulary: add aliases here if the server's names drift.
 */
export const EVENT_KINDS = {
  status: 'status', job_status: 'status', state: 'status', done: 'status', complete: 'status',
  completed: 'status', succeeded: 'status', failed: 'status', cancelled: 'status',
  metrics: 'metrics', metric: 'metrics', step: 'metrics', progress: 'metrics', train: 'metrics',
  eval: 'eval', evaluation: 'eval', validation: 'eval', valid: 'eval',
  checkpoint: 'checkpoint', checkpoints: 'checkpoint', save: 'checkpoint',
  log: 'log', message: 'log', warning: 'log', warn: 'log',
  heartbeat: 'heartbeat', ping: 'heartbeat',
};

/** The SSE event names the page subscribes to (EventSource needs them spelled out). */
export const SSE_EVENT_NAMES = Object.keys(EVENT_KINDS).filter((n) => n !== 'message');

/** Field name → accepted spellings, first match wins. */
export const FIELD_ALIASES = {
  step: ['step', 'current_steps', 'global_step', 'current_step'],
  total_steps: ['total_steps', 'max_steps'],
  epoch: ['epoch'],
  train_loss: ['train_loss', 'loss', 'training_loss'],
  learning_rate: ['learning_rate', 'lr'],
  grad_norm: ['grad_norm', 'gradient_norm'],
  train_mean_token_accuracy: ['train_mean_token_accuracy', 'mean_token_accuracy', 'accuracy'],
  num_tokens: ['num_tokens', 'total_tokens', 'tokens'],
  tokens_per_second: ['tokens_per_second', 'tokens_per_sec', 'throughput'],
  elapsed_seconds: ['elapsed_seconds', 'elapsed_time', 'elapsed'],
  eta_seconds: ['eta_seconds', 'remaining_time', 'eta', 'remaining_seconds'],
  eval_loss: ['eval_loss', 'valid_loss', 'validation_loss', 'full_valid_loss'],
  eval_mean_token_accuracy: ['eval_mean_token_accuracy', 'valid_mean_token_accuracy'],
  status: ['status', 'state'],
  device: ['device'],
};

const num = (v) => {
  if (typeof v === 'number') return Number.isFinite(v) ? v : null;
  if (typeof v === 'string' && v.trim() !== '' && Number.isFinite(Number(v))) return Number(v);
  return null;
};

/** Read `name` (through its aliases) from the first object that has it. */
export function pick(name, ...objs) {
  const keys = FIELD_ALIASES[name] || [name];
  for (const o of objs) {
    if (!o || typeof o !== 'object') continue;
    for (const k of keys) if (o[k] !== undefined && o[k] !== null) return o[k];
  }
  return undefined;
}

export const pickNum = (name, ...objs) => num(pick(name, ...objs));

/** Parse an SSE `id:` (the event's seq). Non-numeric ids give null. */
export function parseSeq(id) {
  if (id === undefined || id === null || id === '') return null;
  const s = String(id).trim();
  return /^\d+$/.test(s) ? Number(s) : null;
}

/**
 * Normalise one stream message into {seq, kind, level, message, createdAt, data, status}.
 * `name` is the SSE event name, `raw` the parsed JSON of `data:`, `lastEventId` the SSE id.
 */
export function normalizeEvent(name, raw, lastEventId) {
  const obj = raw && typeof raw === 'object' ? raw : { message: String(raw ?? '') };
  const data = obj.data && typeof obj.data === 'object' ? obj.data : obj;
  let seq = parseSeq(lastEventId);
  if (seq === null) seq = num(obj.seq) ?? num(data.seq) ?? null;
  // What the sender declared (SSE event name first, then the payload's `type`) ...
  const declared = (name && name !== 'message' && EVENT_KINDS[name]) ||
    (typeof obj.type === 'string' && EVENT_KINDS[obj.type]) || null;
  // ... refined by what the data holds: OpenAI-style streams send status changes and checkpoints
  // as type "message" and eval results as type "metrics".
  const st = pick('status', data, declared === 'status' ? obj : null);
  const hasStep = pick('step', data) !== undefined;
  let kind;
  if (declared === 'heartbeat') kind = 'heartbeat';
  else if (declared === 'checkpoint' || data.checkpoint_id !== undefined || data.checkpoint !== undefined) kind = 'checkpoint';
  else if (declared === 'status' || (typeof st === 'string' && (declared === null || declared === 'log'))) kind = 'status';
  else if (hasStep && pick('train_loss', data) !== undefined) kind = 'metrics';
  else if (pick('eval_loss', data) !== undefined) kind = 'eval';
  else kind = declared === 'metrics' || declared === 'eval' ? 'log' : (declared || 'log');
  let status = kind === 'status' ? st : undefined;
  if (kind === 'status' && typeof status !== 'string' && name && TERMINAL.has(name)) status = name;
  return {
    seq,
    kind,
    level: typeof obj.level === 'string' ? obj.level : 'info',
    message: typeof obj.message === 'string' ? obj.message : '',
    createdAt: obj.created_at ?? null,
    data,
    status: typeof status === 'string' ? status : undefined,
  };
}

/** TensorBoard's debiased EMA: last = last·w + (1−w)·y; out = last / (1 − w^n). Nulls pass through. */
export function emaDebiased(ys, w) {
  const out = new Array(ys.length);
  let last = 0;
  let n = 0;
  for (let i = 0; i < ys.length; i++) {
    const y = ys[i];
    if (y === null || y === undefined || !Number.isFinite(y)) { out[i] = null; continue; }
    n++;
    last = last * w + (1 - w) * y;
    const debias = 1 - Math.pow(w, n);
    out[i] = debias > 0 ? last / debias : y;
  }
  return out;
}

/**
 * A run's points, keyed by step so that replays and resumed runs never duplicate a point, plus
 * the stream position (last seq) so that reconnects ask only for what was missed.
 */
export class RunSeries {
  constructor() {
    this.lastSeq = null;
    this.metrics = new Map(); // step → normalised metrics
    this.evals = new Map(); // step → {eval_loss, eval_mean_token_accuracy}
    this.latest = null; // last metrics in stream order
    this.latestEval = null;
    this.duplicates = 0; // events dropped as already seen
  }

  /** True when the event is new; false when its seq was already processed. */
  acceptSeq(seq) {
    if (seq === null || seq === undefined) return true;
    if (this.lastSeq !== null && seq <= this.lastSeq) { this.duplicates++; return false; }
    this.lastSeq = seq;
    return true;
  }

  addMetrics(data) {
    const step = pickNum('step', data);
    if (step === null) return null;
    // A repeated step replaces the earlier one (a resumed run re-logging it), but a record
    // without a training loss never erases one that has it.
    if (pickNum('train_loss', data) === null && this.metrics.has(step)) return this.metrics.get(step);
    const m = { step };
    for (const k of ['total_steps', 'epoch', 'train_loss', 'learning_rate', 'grad_norm',
      'train_mean_token_accuracy', 'num_tokens', 'tokens_per_second', 'elapsed_seconds', 'eta_seconds']) {
      m[k] = pickNum(k, data);
    }
    this.metrics.set(step, m);
    this.latest = m;
    return m;
  }

  addEval(data) {
    const step = pickNum('step', data);
    const loss = pickNum('eval_loss', data);
    if (step === null || loss === null) return null;
    const e = { step, eval_loss: loss, eval_mean_token_accuracy: pickNum('eval_mean_token_accuracy', data) };
    this.evals.set(step, e);
    this.latestEval = e;
    return e;
  }

  /** Distinct steps with a training loss: the number of loss points on the chart. */
  get points() {
    let n = 0;
    for (const m of this.metrics.values()) if (m.train_loss !== null) n++;
    return n;
  }

  steps() {
    return [...this.metrics.keys()].sort((a, b) => a - b);
  }

  /** uPlot columns: [x, raw loss, smoothed loss, eval loss, learning rate, grad norm]. */
  columns(weight, { positiveOnly = false } = {}) {
    const xs = [...new Set([...this.metrics.keys(), ...this.evals.keys()])].sort((a, b) => a - b);
    const clean = (v) => (v === null || v === undefined || (positiveOnly && v <= 0) ? null : v);
    const raw = xs.map((x) => clean(this.metrics.get(x)?.train_loss ?? null));
    const lossOnly = raw.filter((v) => v !== null);
    const smoothedOnly = emaDebiased(lossOnly, weight);
    let j = 0;
    const smooth = raw.map((v) => (v === null ? null : smoothedOnly[j++]));
    const ev = xs.map((x) => clean(this.evals.get(x)?.eval_loss ?? null));
    const lr = xs.map((x) => this.metrics.get(x)?.learning_rate ?? null);
    const gn = xs.map((x) => this.metrics.get(x)?.grad_norm ?? null);
    return [xs, raw, smooth, ev, lr, gn];
  }
}
