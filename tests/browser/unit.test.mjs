// Unit tests of the dashboard's pure modules (formatting, the event vocabulary, de-duplication,
// smoothing). No browser, no server: `node --test unit.test.mjs`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT } from './harness.mjs';

// static/*.js are browser ES modules beside no package.json: load each as a data: URL, its
// relative imports rewritten to data: URLs of the modules they name.
const sources = new Map();
function moduleUrl(name) {
  if (!sources.has(name)) {
    const src = fs.readFileSync(path.join(ROOT, 'static', name), 'utf8')
      .replace(/from '\.\/([\w.-]+\.js)'/g, (_, dep) => `from '${moduleUrl(dep)}'`);
    sources.set(name, `data:text/javascript;base64,${Buffer.from(src).toString('base64')}`);
  }
  return sources.get(name);
}
const load = (name) => import(moduleUrl(name));
const F = await load('format.js');
const S = await load('series.js');
const V = await load('vocabulary.js');
const C = await load('chatstream.js');

test('numbers read like people write them', () => {
  assert.equal(F.fmtLR(2e-4), '2e-4');
  assert.equal(F.fmtLR(1.234e-4), '1.23e-4');
  assert.equal(F.fmtNum(1.23e-4), '1.23e-4');
  assert.equal(F.fmtNum(2.345678), '2.346');
  assert.equal(F.fmtNum(0.5), '0.5');
  assert.equal(F.fmtNum(0), '0');
  assert.equal(F.fmtNum(null), '—');
  assert.equal(F.fmtNum(NaN), '—');
  assert.equal(F.fmtRate(12345.6), '12.3k tok/s');
  assert.equal(F.fmtRate(950), '950 tok/s');
  assert.equal(F.fmtRate(2_500_000), '2.5M tok/s');
  assert.equal(F.fmtCount(49400), '49.4k');
  assert.equal(F.fmtCount(999_999), '1M');
  assert.equal(F.fmtDuration(42), '42s');
  assert.equal(F.fmtDuration(192), '3m 12s');
  assert.equal(F.fmtDuration(3900), '1h 05m');
  assert.equal(F.fmtDuration(2 * 86400 + 3 * 3600 + 5), '2d 3h');
  assert.equal(F.fmtDuration(-1), '—');
  assert.equal(F.fmtBytes(512), '512 B');
  assert.equal(F.fmtBytes(4096), '4.0 KB');
  assert.equal(F.fmtPct(37.5), '38%');
  assert.equal(F.fmtPct(7.5), '7.5%');
  assert.equal(F.fmtPct(100), '100%');
  assert.ok(F.toDate(1764300000) instanceof Date);
  assert.equal(F.toDate(1764300000).getTime(), 1764300000 * 1000);
  assert.equal(F.toDate(null), null);
});

test('debiased EMA matches TensorBoard', () => {
  const w = 0.6;
  const ys = [3, 2, null, 1];
  const out = S.emaDebiased(ys, w);
  // n=1: last=0.4*3=1.2, /0.4 = 3 (the first point is the point itself)
  assert.ok(Math.abs(out[0] - 3) < 1e-12);
  // n=2: last=1.2*0.6+0.8=1.52, /(1-0.36)=2.375
  assert.ok(Math.abs(out[1] - 2.375) < 1e-12);
  assert.equal(out[2], null);
  // n=3: last=1.52*0.6+0.4=1.312, /(1-0.216)=1.673469…
  assert.ok(Math.abs(out[3] - 1.312 / 0.784) < 1e-12);
  assert.deepEqual(S.emaDebiased([1, 2, 3], 0), [1, 2, 3]);
});

const metricsEvent = (seq, step, extra = {}) => ({
  id: String(seq),
  raw: { id: `ftevent-${seq}`, object: 'fine_tuning.job.event', seq, created_at: 1, level: 'info', message: `step ${step}`, type: 'metrics',
    data: { step, total_steps: 10, epoch: step / 10, train_loss: 3 - step / 10, learning_rate: 2e-4, grad_norm: 1, ...extra } },
});

test("the server's events are classified by their type and data, in its own words only", () => {
  const ev = (type, data, message = '') => ({ id: 'ftevent-x-1', object: 'fine_tuning.job.event', seq: 1, created_at: 1, level: 'info', message, type, data });
  const e = metricsEvent(7, 3);
  let n = V.classify(e.raw, e.id);
  assert.equal(n.kind, 'metrics'); assert.equal(n.seq, 7); assert.equal(n.data.step, 3);
  n = V.classify(ev('message', { status: 'running' }, 'Job started'), '3');
  assert.equal(n.kind, 'status'); assert.equal(n.status, 'running');
  n = V.classify(ev('message', { checkpoint_id: 'ftckpt-1', step: 4 }, 'Checkpoint saved at step 4'), '4');
  assert.equal(n.kind, 'checkpoint');
  n = V.classify(ev('message', null, 'Loading model'), '5');
  assert.equal(n.kind, 'log'); assert.equal(n.message, 'Loading model');
  n = V.classify(ev('metrics', { step: 4, valid_loss: 1.1, valid_mean_token_accuracy: 0.5, eval_tokens: 10 }), '6');
  assert.equal(n.kind, 'eval');
  n = V.classify(ev('metrics', { step: 4, train_loss: 1.3, learning_rate: 1e-4 }), '7');
  assert.equal(n.kind, 'metrics');
  // seq from the payload when the SSE id is missing
  n = V.classify({ ...ev('metrics', { step: 5, train_loss: 1 }), seq: 9 }, '');
  assert.equal(n.seq, 9);
  assert.equal(V.parseSeq('abc'), null);
  assert.equal(V.parseSeq('42'), 42);
  // Other spellings are not the server's: they are not metrics, and no field is read through an alias.
  n = V.classify({ type: 'metrics', data: { step: 4, loss: 1.5, lr: 1e-4 } }, '9');
  assert.equal(n.kind, 'log');
  n = V.classify({ type: 'status', data: { status: 'succeeded' } }, '10');
  assert.equal(n.kind, 'log');
  n = V.classify({ type: 'metrics', data: { step: 5, eval_loss: 1.2 } }, '12');
  assert.equal(n.kind, 'log');
  const rs = new S.RunSeries();
  assert.equal(rs.addMetrics({ step: 4, loss: 1.5 }), null);
  assert.equal(rs.addEval({ step: 4, eval_loss: 1.5 }), null);
  // an eval record for a step never erases that step's training loss
  rs.addMetrics({ step: 4, train_loss: 1.3 });
  rs.addMetrics({ step: 4, valid_loss: 1.1 });
  assert.equal(rs.metrics.get(4).train_loss, 1.3);
  // mixed-precision fields travel with the step
  rs.addMetrics({ step: 5, train_loss: 1.2, loss_scale: 65536, skipped_steps: 2 });
  assert.equal(rs.latest.loss_scale, 65536); assert.equal(rs.latest.skipped_steps, 2);
});

test('replays and reconnects never duplicate or drop a point', () => {
  const rs = new S.RunSeries();
  const feed = (list) => {
    for (const e of list) {
      const n = V.classify(e.raw, e.id);
      if (!rs.acceptSeq(n.seq)) continue;
      if (n.kind === 'metrics') rs.addMetrics(n.data);
    }
  };
  const all = Array.from({ length: 10 }, (_, i) => metricsEvent(i + 1, i + 1));
  feed(all.slice(0, 6));
  feed(all.slice(3, 10)); // a reconnect that replays 4..6 again
  feed(all); // a full replay
  assert.equal(rs.points, 10);
  assert.equal(rs.duplicates, 3 + 10);
  assert.deepEqual(rs.steps(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  // A resumed run re-logging steps it already logged (new seqs) replaces them instead of zig-zagging.
  feed([metricsEvent(11, 9, { train_loss: 0.5 }), metricsEvent(12, 10, { train_loss: 0.4 })]);
  assert.equal(rs.points, 10);
  const [xs, raw, smooth, ev, lr] = rs.columns(0.6);
  assert.deepEqual(xs, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  assert.equal(raw[8], 0.5);
  assert.equal(smooth.length, 10);
  assert.equal(ev.every((v) => v === null), true);
  assert.equal(lr[0], 2e-4);
});

test('eval points share the x axis with the loss', () => {
  const rs = new S.RunSeries();
  rs.addMetrics({ step: 1, train_loss: 2 });
  rs.addMetrics({ step: 2, train_loss: 1.5 });
  rs.addEval({ step: 0, valid_loss: 2.5 });
  rs.addEval({ step: 2, valid_loss: 1.7 });
  const [xs, raw, smooth, ev] = rs.columns(0.5);
  assert.deepEqual(xs, [0, 1, 2]);
  assert.deepEqual(raw, [null, 2, 1.5]);
  assert.equal(smooth[0], null);
  assert.deepEqual(ev, [2.5, null, 1.7]);
  assert.equal(rs.points, 2);
  // log scale drops non-positive values instead of breaking the axis
  rs.addMetrics({ step: 3, train_loss: 0 });
  assert.equal(rs.columns(0.5, { positiveOnly: true })[1][3], null);
});

test('tool-call evaluations are their own kind and their own columns', () => {
  const data = { step: 0, tool_eval_examples: 6, tool_call_examples: 4, tool_name_accuracy: 0.5, tool_args_exact: 0.25, tool_json_valid: 0.75, no_call_accuracy: null, tool_args_valid: 0.5, tool_eval_seconds: 2 };
  const n = V.classify({ id: 'ftevent-x-2', object: 'fine_tuning.job.event', seq: 2, created_at: 1, level: 'info', message: '', type: 'metrics', data }, '2');
  assert.equal(n.kind, 'tool_eval');
  const rs = new S.RunSeries();
  assert.equal(rs.addToolEval({ step: 1, tool_name_accuracy: 0.5 }), null, 'no example count: not a tool evaluation');
  rs.addToolEval(data);
  rs.addMetrics({ step: 1, train_loss: 2 });
  rs.addToolEval({ ...data, step: 2, tool_name_accuracy: 1 });
  const cols = rs.columns(0.5);
  assert.deepEqual(cols[0], [0, 1, 2]);
  assert.equal(cols.length, 6 + V.TOOL_RATES.length);
  assert.deepEqual(cols[6], [0.5, null, 1], 'tool_name_accuracy by step');
  assert.deepEqual(cols[8], [0.5, null, 0.5], 'tool_args_valid by step');
  assert.deepEqual(cols[10], [null, null, null], 'no_call_accuracy without no-call turns');
  assert.equal(rs.latestToolEval.step, 2);
});

test('the chart reports its steps as ranges', () => {
  assert.equal(S.stepRanges([]), '');
  assert.equal(S.stepRanges([1, 2, 3, 4]), '1-4');
  assert.equal(S.stepRanges([1, 2, 4, 6, 7]), '1-2,4,6-7');
});

test('a streamed chat completion folds into content, tool calls, finish reason and usage', () => {
  const chunk = (delta, finish = null) => JSON.stringify({ object: 'chat.completion.chunk', choices: [{ index: 0, delta, finish_reason: finish }] });
  const body = [
    chunk({ role: 'assistant', content: '' }), chunk({ content: 'Let me ' }), chunk({ content: 'check.' }),
    chunk({ tool_calls: [{ index: 0, id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } }] }),
    chunk({}, 'tool_calls'),
    JSON.stringify({ object: 'chat.completion.chunk', choices: [], usage: { prompt_tokens: 9, completion_tokens: 4, total_tokens: 13 } }),
    '[DONE]',
  ].map((d) => `data: ${d}\n\n`).join('');
  // Split anywhere, even inside a message: the unfinished rest waits for the next piece.
  const a = C.emptyAnswer();
  let rest = '';
  for (const piece of [body.slice(0, 37), body.slice(37, 200), body.slice(200)]) {
    const [payloads, r] = C.sseData(rest + piece);
    rest = r;
    for (const p of payloads) C.foldChunk(a, p);
  }
  assert.equal(rest, '');
  assert.equal(a.content, 'Let me check.');
  assert.deepEqual(a.toolCalls, [{ id: 'call_1', name: 'get_weather', arguments: '{"city":"Paris"}' }]);
  assert.equal(a.finish, 'tool_calls');
  assert.equal(a.usage.total_tokens, 13);
  assert.equal(a.done, true);
  assert.equal(C.formatToolCall(a.toolCalls[0]), 'get_weather({\n  "city": "Paris"\n})');
  assert.equal(C.formatToolCall({ name: 'f', arguments: '{bad' }), 'f({bad)');
  const e = C.foldChunk(C.emptyAnswer(), JSON.stringify({ error: { message: 'generation failed' } }));
  assert.equal(e.error, 'generation failed');
});
