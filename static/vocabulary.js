// The server's words, spelled once: job statuses, the event envelope, each kind of event's `data`
// and the job object's fields, exactly as openapi.yaml (and src/train/events.rs) define them.
// No aliases: tests/browser/unit.test.mjs fails when this file and openapi.yaml disagree.
// Pure (no DOM).

/** Job.status, in lifecycle order. */
export const JOB_STATUSES = ['validating_files', 'queued', 'running', 'succeeded', 'failed', 'cancelled'];
export const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);

/** Event: the envelope every event (JSON page or SSE `data:`) has. */
export const EVENT_FIELDS = ['id', 'object', 'seq', 'created_at', 'level', 'message', 'type', 'data'];
/** Event.type. */
export const EVENT_TYPES = ['message', 'metrics'];
export const EVENT_LEVELS = ['info', 'warn', 'error'];

/**
 * Event.data by kind (openapi.yaml's `<Kind>EventData` schemas): the `type` it travels under, the
 * field whose presence marks it, and every field it has. Events of type `message` whose data is
 * null are log lines.
 */
export const EVENT_DATA = {
  status: { type: 'message', key: 'status', fields: ['status', 'interrupted'] },
  metrics: {
    type: 'metrics',
    key: 'train_loss',
    fields: ['step', 'total_steps', 'epoch', 'train_loss', 'learning_rate', 'grad_norm',
      'train_mean_token_accuracy', 'num_tokens', 'tokens_per_second', 'elapsed_seconds',
      'eta_seconds', 'loss_scale', 'skipped_steps'],
  },
  eval: { type: 'metrics', key: 'valid_loss', fields: ['step', 'valid_loss', 'valid_mean_token_accuracy', 'eval_tokens'] },
  tool_eval: {
    type: 'metrics',
    key: 'tool_eval_examples',
    fields: ['step', 'tool_eval_examples', 'tool_call_examples', 'tool_name_accuracy', 'tool_args_exact',
      'tool_json_valid', 'no_call_accuracy', 'tool_args_valid', 'tool_eval_seconds'],
  },
  checkpoint: { type: 'message', key: 'checkpoint_id', fields: ['checkpoint_id', 'step'] },
};

/** Job: every field of the job object. */
export const JOB_FIELDS = ['id', 'object', 'created_at', 'started_at', 'finished_at', 'estimated_finish',
  'model', 'fine_tuned_model', 'organization_id', 'status', 'training_file', 'validation_file',
  'tool_eval_file', 'hyperparameters', 'method', 'result_files', 'trained_tokens', 'error', 'seed', 'suffix',
  'user_provided_suffix', 'metadata', 'integrations', 'init_adapter', 'estimated_peak_memory_bytes'];

/** Checkpoint.metrics: what a saved checkpoint records. */
export const CHECKPOINT_METRICS = ['step', 'train_loss', 'train_mean_token_accuracy', 'valid_loss',
  'valid_mean_token_accuracy', 'tool_name_accuracy', 'tool_args_exact', 'tool_json_valid', 'no_call_accuracy',
  'tool_args_valid'];

/** The tool-call accuracies of a tool_eval event, in the order the chart draws them. */
export const TOOL_RATES = ['tool_name_accuracy', 'tool_args_exact', 'tool_args_valid', 'tool_json_valid',
  'no_call_accuracy'];

const finite = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : null);

/** The numeric fields of `data` named in `fields` (absent or non-numeric: null). */
export function numbers(data, fields) {
  const out = {};
  for (const f of fields) out[f] = finite(data?.[f]);
  return out;
}

/** Parse an SSE `id:` (the event's seq). Non-numeric ids give null. */
export function parseSeq(id) {
  if (id === undefined || id === null || id === '') return null;
  const s = String(id).trim();
  return /^\d+$/.test(s) ? Number(s) : null;
}

/**
 * One event (a parsed Event object) → {seq, kind, level, message, createdAt, data, status}, where
 * kind is a key of EVENT_DATA or 'log'. `sseId` (the SSE `id:`) wins over the payload's seq.
 */
export function classify(event, sseId = null) {
  const e = event && typeof event === 'object' ? event : {};
  const data = e.data && typeof e.data === 'object' ? e.data : null;
  let kind = 'log';
  if (data) {
    for (const [k, d] of Object.entries(EVENT_DATA)) {
      if (e.type === d.type && data[d.key] !== undefined && data[d.key] !== null) { kind = k; break; }
    }
  }
  return {
    seq: parseSeq(sseId) ?? finite(e.seq),
    kind,
    level: EVENT_LEVELS.includes(e.level) ? e.level : 'info',
    message: typeof e.message === 'string' ? e.message : '',
    createdAt: e.created_at ?? null,
    data: data || {},
    status: kind === 'status' && JOB_STATUSES.includes(data.status) ? data.status : undefined,
  };
}
