// A run's chart data: metrics and eval points keyed by step (so replays and resumed runs never
// duplicate a point), the stream position, and TensorBoard's smoothing. Pure (no DOM).
import { EVENT_DATA, TOOL_RATES, numbers } from './vocabulary.js';

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

/** Sorted integers → "1-8,10,12-13" (how the chart reports the steps it holds). */
export function stepRanges(steps) {
  const parts = [];
  for (let i = 0; i < steps.length;) {
    let j = i;
    while (j + 1 < steps.length && steps[j + 1] === steps[j] + 1) j++;
    parts.push(i === j ? `${steps[i]}` : `${steps[i]}-${steps[j]}`);
    i = j + 1;
  }
  return parts.join(',');
}

export class RunSeries {
  constructor() {
    this.lastSeq = null;
    this.metrics = new Map(); // step → metrics data (EVENT_DATA.metrics fields)
    this.evals = new Map(); // step → eval data (EVENT_DATA.eval fields)
    this.toolEvals = new Map(); // step → tool-call evaluation (EVENT_DATA.tool_eval fields)
    this.latest = null; // last metrics in stream order
    this.latestEval = null;
    this.latestToolEval = null;
    this.duplicates = 0; // events dropped as already seen
  }

  /** True when the event is new; false when its seq was already processed. */
  acceptSeq(seq) {
    if (seq === null || seq === undefined) return true;
    if (this.lastSeq !== null && seq <= this.lastSeq) { this.duplicates++; return false; }
    this.lastSeq = seq;
    return true;
  }

  /** A metrics event's data. A repeated step (a resumed run re-logging it) replaces the earlier one. */
  addMetrics(data) {
    const m = numbers(data, EVENT_DATA.metrics.fields);
    if (m.step === null || m.train_loss === null) return null;
    this.metrics.set(m.step, m);
    this.latest = m;
    return m;
  }

  /** An eval event's data. */
  addEval(data) {
    const e = numbers(data, EVENT_DATA.eval.fields);
    if (e.step === null || e.valid_loss === null) return null;
    this.evals.set(e.step, e);
    this.latestEval = e;
    return e;
  }

  /** A tool-call evaluation's data (step 0: the model before training). */
  addToolEval(data) {
    const t = numbers(data, EVENT_DATA.tool_eval.fields);
    if (t.step === null || t.tool_eval_examples === null) return null;
    this.toolEvals.set(t.step, t);
    this.latestToolEval = t;
    return t;
  }

  /** Distinct steps with a training loss: the number of loss points on the chart. */
  get points() {
    return this.metrics.size;
  }

  steps() {
    return [...this.metrics.keys()].sort((a, b) => a - b);
  }

  /**
   * uPlot columns: [x, raw loss, smoothed loss, eval loss, learning rate, grad norm, then the
   * tool-call rates in TOOL_RATES order].
   */
  columns(weight, { positiveOnly = false } = {}) {
    const xs = [...new Set([...this.metrics.keys(), ...this.evals.keys(), ...this.toolEvals.keys()])].sort((a, b) => a - b);
    const clean = (v) => (v === null || v === undefined || (positiveOnly && v <= 0) ? null : v);
    const raw = xs.map((x) => clean(this.metrics.get(x)?.train_loss ?? null));
    const smoothedOnly = emaDebiased(raw.filter((v) => v !== null), weight);
    let j = 0;
    const smooth = raw.map((v) => (v === null ? null : smoothedOnly[j++]));
    const ev = xs.map((x) => clean(this.evals.get(x)?.valid_loss ?? null));
    const lr = xs.map((x) => this.metrics.get(x)?.learning_rate ?? null);
    const gn = xs.map((x) => this.metrics.get(x)?.grad_norm ?? null);
    const tools = TOOL_RATES.map((f) => xs.map((x) => this.toolEvals.get(x)?.[f] ?? null));
    return [xs, raw, smooth, ev, lr, gn, ...tools];
  }
}
